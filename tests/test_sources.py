"""sources.py: streaming JSONL / gzip / Parquet readers, exact on good input, precise on bad."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch.errors import InputError
from batch.sources import BATCH_ROWS, MISSING, count_rows, read_batches

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
records = st.lists(st.fixed_dictionaries({"id": st.text(min_size=1, max_size=10)},
                                         optional={"text": json_values, "other": json_values}), max_size=40)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def collect(path: Path, fmt: str, columns: list[str]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {c: [] for c in columns}
    for batch in read_batches(path, fmt, columns):
        for c in columns:
            out[c].extend(batch.columns[c])
    return out


class TestJsonl:
    @SETTINGS
    @given(rows=records, gz=st.booleans())
    def test_valid_rows_are_read_exactly(self, tmp_path: Path, rows: list[dict[str, Any]], gz: bool) -> None:
        """Every generated row comes back with its values; absent keys are MISSING, not None."""
        path = tmp_path / ("in.jsonl.gz" if gz else "in.jsonl")
        data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
        path.write_bytes(gzip.compress(data) if gz else data)
        got = collect(path, "jsonl", ["id", "text"])
        assert got["id"] == [r["id"] for r in rows]
        assert got["text"] == [r.get("text", MISSING) for r in rows]
        assert count_rows(path, "jsonl") == len(rows)

    @SETTINGS
    @given(rows=st.lists(st.fixed_dictionaries({"id": st.integers(-(2**63), 2**63 - 1)}), min_size=1, max_size=30),
           bad_at=st.integers(0, 29), junk=st.sampled_from(['{"id": ', "[1, 2]", "nul", '{"a": 1}}', "\"str\""]))
    def test_broken_line_is_reported_with_its_number(self, tmp_path: Path, rows: list[dict[str, Any]],
                                                     bad_at: int, junk: str) -> None:
        """A malformed line anywhere is an InputError naming file:line, never another exception."""
        bad_at = bad_at % len(rows)
        lines = [orjson.dumps(r).decode() for r in rows]
        lines[bad_at] = junk
        path = tmp_path / "in.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(InputError) as info:
            collect(path, "jsonl", ["id"])
        assert f"in.jsonl:{bad_at + 1}:" in str(info.value)

    @SETTINGS
    @given(blob=st.binary(max_size=300))
    def test_arbitrary_bytes_never_crash(self, tmp_path: Path, blob: bytes) -> None:
        """Any bytes at all either read as rows or raise InputError."""
        path = tmp_path / "in.jsonl"
        path.write_bytes(blob)
        try:
            collect(path, "jsonl", ["id"])
        except InputError:
            pass

    def test_blank_lines_are_skipped_and_line_numbers_stay_true(self, tmp_path: Path) -> None:
        """Blank lines do not shift the line numbers reported for rows."""
        path = tmp_path / "in.jsonl"
        path.write_text('{"id": 1}\n\n{"id": 2}\n')
        batch = next(read_batches(path, "jsonl", ["id"]))
        assert batch.where(1) == "line 3"

    def test_truncated_gzip_is_an_input_error(self, tmp_path: Path) -> None:
        """A gzip file cut short says so instead of raising EOFError."""
        data = gzip.compress(b"".join(orjson.dumps({"id": i, "text": "x" * 50}) + b"\n" for i in range(2000)))
        path = tmp_path / "in.jsonl.gz"
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(InputError, match="damaged or truncated"):
            collect(path, "jsonl", ["id"])

    def test_batches_are_bounded(self, tmp_path: Path) -> None:
        """Rows arrive in batches of at most BATCH_ROWS, so memory does not follow the file size."""
        path = tmp_path / "in.jsonl"
        path.write_bytes(b"".join(orjson.dumps({"id": i}) + b"\n" for i in range(BATCH_ROWS * 2 + 5)))
        sizes = [b.size for b in read_batches(path, "jsonl", ["id"])]
        assert sizes == [BATCH_ROWS, BATCH_ROWS, 5]


class TestParquet:
    @SETTINGS
    @given(n=st.integers(0, 3000), group=st.integers(1, 1500))
    def test_rows_are_read_exactly_across_row_groups(self, tmp_path: Path, n: int, group: int) -> None:
        """Every row of every row group comes back once, in order."""
        path = tmp_path / "in.parquet"
        pq.write_table(pa.table({"id": list(range(n)), "text": [f"t{i}" for i in range(n)]}), path,
                       row_group_size=group)
        got = collect(path, "parquet", ["id", "text"])
        assert got["id"] == list(range(n))
        assert count_rows(path, "parquet") == n

    def test_missing_column_names_the_columns_there_are(self, tmp_path: Path) -> None:
        """A wrong column name is reported with the columns the file has."""
        path = tmp_path / "in.parquet"
        pq.write_table(pa.table({"id": [1], "body": ["x"]}), path)
        with pytest.raises(InputError, match="no column 'text'; the file has id, body"):
            collect(path, "parquet", ["id", "text"])

    @pytest.mark.parametrize("damage", ["not parquet at all", "truncate"])
    def test_unreadable_file_is_an_input_error(self, tmp_path: Path, damage: str) -> None:
        """A file that is not Parquet, or is cut short, is an InputError naming it."""
        path = tmp_path / "in.parquet"
        if damage == "truncate":
            pq.write_table(pa.table({"id": list(range(1000))}), path)
            path.write_bytes(path.read_bytes()[:-200])
        else:
            path.write_text(damage)
        with pytest.raises(InputError, match="in.parquet"):
            collect(path, "parquet", ["id"])


class TestParquetMemory:
    def test_one_huge_row_group_is_not_held_whole_while_read(self, tmp_path: Path) -> None:
        """A file written as one row group (pandas' and pyarrow's default up to 1Mi rows) is read page by
        page: halfway through, Arrow holds what a few pages take, not the column chunks."""
        import os

        texts = [os.urandom(75).hex() for _ in range(200_000)]  # 150 characters that do not compress
        path = tmp_path / "one-group.parquet"
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(texts))], "text": texts}), path,
                       row_group_size=1 << 20)
        assert pq.ParquetFile(path).metadata.num_row_groups == 1
        before = pa.total_allocated_bytes()
        held = 0
        for i, batch in enumerate(read_batches(path, "parquet", ["id", "text"])):
            if i == len(texts) // BATCH_ROWS // 2:
                held = pa.total_allocated_bytes() - before
        assert held < path.stat().st_size / 3, f"{held / 1e6:.1f} MB held halfway through a {path.stat().st_size / 1e6:.0f} MB file"
