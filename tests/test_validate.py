"""Bad input: found before anything is sent, reported with where and what, never losing answers."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from batch.prompts import PromptBuilder
from batch.sim import SimThread
from batch.sources import RowBatch
from tests.conftest import run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]
DEAD = "http://127.0.0.1:9/v1"  # nothing listens: validate and blocked runs must not need it


def good(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"row {i}"} for i in range(n)]


def validate(tmp: Path, data: Path, **kw: Any) -> tuple[int, str]:
    proc = run_cli("validate", str(write_job(tmp, input_path=data, base_url=DEAD, **kw)))
    return proc.returncode, proc.stdout + proc.stderr


class TestValidate:
    def test_clean_input_is_ready(self, tmp_path: Path) -> None:
        """A clean job and input: exit 0, 'ready to run'."""
        code, out = validate(tmp_path, write_jsonl(tmp_path / "in.jsonl", good(20)))
        assert code == 0 and "ready to run" in out and "20 rows" in out

    def test_malformed_line_names_line_and_excerpt(self, tmp_path: Path) -> None:
        """A broken JSONL line is blocking, with its number and an excerpt of it."""
        data = tmp_path / "in.jsonl"
        data.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "unclosed\n{"id": "c", "text": "z"}\n')
        code, out = validate(tmp_path, data)
        assert code == 2 and "in.jsonl:2" in out and '"unclosed' in out and "column" in out

    def test_invalid_utf8_says_so(self, tmp_path: Path) -> None:
        """Non-UTF-8 bytes are reported as an encoding problem with a way to fix it."""
        data = tmp_path / "in.jsonl"
        data.write_bytes(b'{"id": "a", "text": "caf\xe9"}\n')
        code, out = validate(tmp_path, data)
        assert code == 2 and "in.jsonl:1" in out and "UTF-8" in out and "iconv" in out

    def test_byte_order_mark_is_accepted(self, tmp_path: Path) -> None:
        """A UTF-8 BOM at the start of the file is not an error."""
        data = tmp_path / "in.jsonl"
        data.write_bytes(b"\xef\xbb\xbf" + b'{"id": "a", "text": "x"}\n')
        assert validate(tmp_path, data)[0] == 0

    def test_empty_file_is_blocking(self, tmp_path: Path) -> None:
        """An empty input is exit 2, not a run that succeeds at nothing."""
        data = tmp_path / "in.jsonl"
        data.write_text("")
        code, out = validate(tmp_path, data)
        assert code == 2 and "no rows" in out

    def test_truncated_gzip(self, tmp_path: Path) -> None:
        """A cut .jsonl.gz is named as damaged or truncated."""
        data = tmp_path / "in.jsonl.gz"
        blob = gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in good(3000)))
        data.write_bytes(blob[: len(blob) // 2])
        code, out = validate(tmp_path, data)
        assert code == 2 and "truncated" in out

    def test_not_parquet(self, tmp_path: Path) -> None:
        """A .parquet that is not Parquet is exit 2 with the file named."""
        data = tmp_path / "in.parquet"
        data.write_text("id,text\n1,x\n")
        code, out = validate(tmp_path, data)
        assert code == 2 and "in.parquet" in out and "Parquet" in out

    def test_wrong_column_name_and_type(self, tmp_path: Path) -> None:
        """A missing column lists the columns there are; a nested column under a template field is named."""
        data = tmp_path / "in.parquet"
        pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), data)
        code, out = validate(tmp_path, data)
        assert code == 2 and "no column 'text'" in out and "id, body" in out
        pq.write_table(pa.table({"id": ["a"], "text": [[1, 2]]}), data)
        code, out = validate(tmp_path, data)
        assert code == 2 and "'text' has type list" in out

    def test_row_problems_are_counted_with_their_fate(self, tmp_path: Path) -> None:
        """Missing and null fields are counted by type, with examples and what will happen to them."""
        rows = good(10) + [{"id": "m"}, {"id": "n", "text": None}, {"id": "o", "text": {"a": 1}}]
        data = write_jsonl(tmp_path / "in.jsonl", rows)
        code, out = validate(tmp_path, data)
        assert code == 0 and "3 rows cannot be sent" in out and "missing_field 1" in out
        assert "null_field 1" in out and "bad_field_type 1" in out and "error rows" in out
        code, out = validate(tmp_path, data, run={"on_bad_row": "fail"})
        assert code == 2

    def test_rows_over_the_context_window_are_reported(self, tmp_path: Path) -> None:
        """Prompts too long for the smallest window are counted, with what will happen to them."""
        data = write_jsonl(tmp_path / "in.jsonl", good(3) + [{"id": "big", "text": "word " * 20_000}])
        code, out = validate(tmp_path, data, models=[{"provider": "local", "model": "m", "context_window": 16385}])
        assert code == 0 and "1 rows exceed the 16385-token window" in out and "context_length" in out

    def test_missing_ids_block(self, tmp_path: Path) -> None:
        """Rows without an id cannot be resumed, so they block unless skipped."""
        data = write_jsonl(tmp_path / "in.jsonl", good(3) + [{"text": "no id"}])
        code, out = validate(tmp_path, data)
        assert code == 2 and "no id" in out and "line 4" in out


class TestRunWithBadRows:
    def test_one_percent_bad_rows(self, tmp_path: Path, sim_factory: Factory) -> None:
        """1% bad rows: exit 1, every good row ok, every bad row an error row with its reason."""
        sim = sim_factory()
        rows: list[dict[str, Any]] = good(2000)
        for i in range(0, 2000, 100):
            rows[i] = {"id": rows[i]["id"], "text": None} if i % 200 else {"id": rows[i]["id"]}
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows), base_url=sim.base_url)
        assert run_cli("run", str(job), "--quiet").returncode == 1
        df = ds.dataset(tmp_path / "out" / "results").to_table().to_pandas().set_index("id")
        bad = {f"r{i}" for i in range(0, 2000, 100)}
        assert len(df) == 2000
        assert (df.loc[sorted(bad), "status"] == "error").all()
        assert set(df.loc[sorted(bad), "error_type"]) == {"null_field", "missing_field"}
        assert df.loc[sorted(bad), "error_message"].str.contains("line").all()
        assert (df.drop(index=sorted(bad))["status"] == "ok").all()
        assert sim.counters.requests == 2000 - len(bad)

    def test_skip_leaves_bad_lines_and_rows_out(self, tmp_path: Path, sim_factory: Factory) -> None:
        """on_bad_row = "skip": malformed lines and bad rows are left out, the rest runs, exit 0."""
        sim = sim_factory()
        data = write_jsonl(tmp_path / "in.jsonl", good(50) + [{"id": "n", "text": None}])
        data.write_text(data.read_text() + "{broken\n")
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, run={"on_bad_row": "skip"})
        proc = run_cli("run", str(job), "--quiet")
        assert proc.returncode == 0, proc.stderr
        assert len(ds.dataset(tmp_path / "out" / "results").to_table()) == 50

    def test_huge_prompt_becomes_an_error_row(self, tmp_path: Path, sim_factory: Factory) -> None:
        """A 5 MB prompt is sent once, refused for its length, and recorded; the run goes on."""
        sim = sim_factory(context_windows={"m": 16385})
        data = write_jsonl(tmp_path / "in.jsonl", good(20) + [{"id": "huge", "text": "lorem ipsum " * 440_000}])
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url,
                        models=[{"provider": "local", "model": "m"}])
        assert run_cli("run", str(job), "--quiet").returncode == 1
        df = pd.read_parquet(tmp_path / "out" / "results").set_index("id")
        assert df.loc["huge", "error_type"] == "context_length"
        assert (df.drop(index="huge")["status"] == "ok").all()


values = st.one_of(st.none(), st.text(max_size=30), st.integers(), st.floats(allow_nan=False), st.booleans(),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries({}, optional={"id": values, "text": values, "who": values}), min_size=1,
                max_size=20))
def test_builder_never_crashes(rows: list[dict[str, Any]]) -> None:
    """Any row values become either a request with a valid JSON body or a named problem, never an exception."""
    from batch.sources import MISSING

    b = PromptBuilder(template="{text} by {who}", messages_column=None, system="s", id_column="id",
                      keep_columns=("who",), request_fields={"max_tokens": 3}, chain_key="m")
    cols = {c: [r.get(c, MISSING) for r in rows] for c in ("id", "text", "who")}
    batch = RowBatch(0, cols, list(range(1, len(rows) + 1)), len(rows))
    reqs = list(b.build(batch, b.ids(batch), None))
    assert len(reqs) == len(rows)
    for r in reqs:
        if r.problem is None:
            assert orjson.loads(r.body_for(b'{"model":"m",'))["messages"][1]["role"] == "user"
        else:
            assert r.problem[0] in {"missing_id", "missing_field", "null_field", "bad_field_type"}
