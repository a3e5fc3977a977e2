"""Replies of odd types are checked and coerced where replies are parsed: one bad value costs its own row
at most, never a part, and every other row is written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from batch.result import Result
from batch.sim import SimThread
from batch.sim_answers import answer_for, truncate
from batch.sinks import result_schema, to_table
from tests.conftest import run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]
N = 300
SCHEMA = {"type": "object", "required": ["stars", "word"], "additionalProperties": False,
          "properties": {"stars": {"type": "integer"}, "word": {"type": "string"}}}


def rows(n: int = N) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "text": f"row {i}"} for i in range(n)]


def results(out: Path) -> pd.DataFrame:
    return ds.dataset(out / "results", format="parquet").to_table().to_pandas().set_index("id")


def expected(i: int) -> str:
    return truncate(answer_for([{"role": "user", "content": f"Say row {i}"}]), 8)[0]


class TestCoercedAtTheParser:
    def test_content_as_parts_is_joined_into_the_answer(self, tmp_path: Path, sim_factory: Factory) -> None:
        """content as a list of text parts is the answer those parts spell."""
        sim = sim_factory(odd_replies={"content_parts": 1.0})
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows()), base_url=sim.base_url)
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path / "out")
        assert len(df) == N and all(df.loc[f"r{i}", "output"] == expected(i) for i in range(N))
        assert sim.counters.odd_replies["content_parts"] == N

    def test_numbers_as_strings_are_counted_as_numbers(self, tmp_path: Path, sim_factory: Factory) -> None:
        """usage numbers and cost sent as strings become ints and floats; totals equal the simulator's."""
        sim = sim_factory(odd_replies={"string_numbers": 1.0})
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows()), base_url=sim.base_url)
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path / "out")
        assert df["prompt_tokens"].sum() == sim.counters.prompt_tokens
        assert df["completion_tokens"].sum() == sim.counters.completion_tokens
        assert df["cost_usd"].sum() == pytest.approx(sim.counters.billed_usd)
        assert (df["cached_tokens"] == 0).all() and (df["cost_source"] == "provider").all()

    def test_usage_of_the_wrong_shape_falls_back_to_prices(self, tmp_path: Path, sim_factory: Factory) -> None:
        """A negative count, a null and a cost of "n/a" are unknowns, not crashes: the price table prices the row."""
        sim = sim_factory(odd_replies={"odd_usage": 0.3}, seed=3)
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows()), base_url=sim.base_url)
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path / "out")
        assert len(df) == N and (df["status"] == "ok").all()
        odd = df[df["cost_source"] == "price_table"]
        assert len(odd) == sim.counters.odd_replies["odd_usage"] > 0

    def test_content_that_is_not_text_fails_only_its_row(self, tmp_path: Path, sim_factory: Factory) -> None:
        """content that is an object is a bad_response naming it: retried, then an error row; every other
        row of every part is written."""
        sim = sim_factory(odd_replies={"bad_content": 0.2}, seed=5)
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows()), base_url=sim.base_url,
                        run={"max_attempts": 1}, output={"flush_rows": 1000})
        proc = run_cli("run", str(job), "--quiet")
        assert proc.returncode == 1, proc.stderr
        df = results(tmp_path / "out")
        assert len(df) == N
        bad = df[df["status"] == "error"]
        assert len(bad) == sim.counters.odd_replies["bad_content"] > 0
        assert (bad["error_type"] == "bad_response").all()
        assert bad["error_message"].str.contains("message content of type dict").all()

    def test_an_integer_beyond_64_bits_is_an_invalid_answer_not_a_lost_part(self, tmp_path: Path,
                                                                            sim_factory: Factory) -> None:
        """A JSON answer holding an integer Parquet cannot store is repaired like any invalid answer; rows
        that stay invalid keep the raw answer; no row of the part is lost and the run does not stop."""
        sim = sim_factory(odd_replies={"huge_int": 0.5}, seed=1)
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows()), base_url=sim.base_url,
                        request={"temperature": 0, "max_tokens": 60}, output={"flush_rows": 1000},
                        extra={"output_format": {"json_schema": SCHEMA, "max_repairs": 1}})
        proc = run_cli("run", str(job), "--quiet")
        assert proc.returncode in (0, 1), proc.stderr
        df = results(tmp_path / "out")
        assert len(df) == N
        ok = df[df["status"] == "ok"]
        assert len(ok) > N // 2 and all(abs(p["stars"]) < 2**63 for p in ok["parsed"])
        invalid = df[df["status"] == "error"]
        assert (invalid["error_type"] == "invalid_output").all()
        assert invalid["output"].str.contains(str(2**70)[:10]).all()


def test_the_writer_turns_only_an_unstorable_row_into_an_error() -> None:
    """Arrow conversion is guarded: the row whose value does not fit becomes an ``unstorable`` error row
    keeping its id, output and kept columns; the others are written as they are."""
    schema = result_schema([("k", pa.string())], parsed=pa.struct([("n", pa.int64())]))

    def row(i: int, n: int) -> Result:
        return Result(f"r{i}", "ok", "text", {"n": n}, "stop", "m", "p", 0, 1, 1, 1, None, None, 0.1, "provider", 1.0,
                      None, None, "h", False, 1, 1, "online", None, None, ({"k": i},))

    table = to_table([row(0, 1), row(1, 2**70), row(2, 3)], schema)
    out = {r["id"]: r for r in table.to_pylist()}
    assert out["r0"]["parsed"] == {"n": 1} and out["r2"]["parsed"] == {"n": 3}
    assert out["r1"]["status"] == "error" and out["r1"]["error_type"] == "unstorable"
    assert out["r1"]["output"] == "text" and out["r1"]["k"] == '{"k":1}' and "parsed" in out["r1"]["error_message"]
