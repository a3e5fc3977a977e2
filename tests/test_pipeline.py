"""End to end through the real CLI: job file in, Parquet results and stats out."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest

from batch.sim import SimThread
from batch.sim_answers import answer_for, truncate
from tests.conftest import run_cli, write_job, write_jsonl

ROWS = 3000


def review_rows(n: int) -> list[dict[str, object]]:
    moods = ["great", "awful", "fine", "broken", "lovely"]
    return [{"id": f"id-{i}", "text": f"item {i} was {moods[i % 5]} (positive/negative/neutral)", "n": i}
            for i in range(n)]


def read_results(out: Path) -> pd.DataFrame:
    return ds.dataset(out / "results", format="parquet").to_table().to_pandas()


class TestFullRun:
    def test_every_row_once_with_the_simulators_answer(self, tmp_path: Path, sim: SimThread) -> None:
        """A few thousand rows come back exactly once, each with the simulator's deterministic answer."""
        rows = review_rows(ROWS)
        data = write_jsonl(tmp_path / "in.jsonl", rows)
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url,
                        input={"keep_columns": ["n"], "system": "Be brief."}, run={"concurrency": 32})
        proc = run_cli("run", str(job), "--quiet")
        assert proc.returncode == 0, proc.stderr
        df = read_results(tmp_path / "out")
        assert len(df) == ROWS
        assert df["id"].is_unique
        assert set(df["id"]) == {r["id"] for r in rows}
        assert (df["status"] == "ok").all()
        by_id = df.set_index("id")
        for r in rows[:: max(1, ROWS // 300)]:
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {r['text']}"}]
            expected, finish = truncate(answer_for(messages), 8)
            assert by_id.loc[r["id"], "output"] == expected
            assert by_id.loc[r["id"], "finish_reason"] == finish
            assert by_id.loc[r["id"], "n"] == str(r["n"])  # JSONL keep columns are strings
        assert sim.counters.requests == ROWS
        assert max(sim.counters.by_prompt.values()) == 1

    def test_usage_in_stats_equals_the_sum_of_result_rows(self, tmp_path: Path, sim: SimThread) -> None:
        """stats.parquet totals equal the per-row usage, which equals what the simulator counted."""
        data = write_jsonl(tmp_path / "in.jsonl", review_rows(500))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url)
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = read_results(tmp_path / "out")
        stats = pd.read_parquet(tmp_path / "out" / "stats.parquet")
        assert stats["prompt_tokens"].sum() == df["prompt_tokens"].sum() == sim.counters.prompt_tokens
        assert stats["completion_tokens"].sum() == df["completion_tokens"].sum() == sim.counters.completion_tokens
        assert stats["cost_usd"].sum() == pytest.approx(df["cost_usd"].sum(), abs=1e-9)
        assert stats["requests"].sum() == 500
        assert (df["cost_source"] == "provider").all()

    def test_parquet_input_keeps_column_types(self, tmp_path: Path, sim: SimThread) -> None:
        """A Parquet input is streamed and its keep_columns keep their Arrow types."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = review_rows(2500)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet", row_group_size=700)
        job = write_job(tmp_path, input_path=tmp_path / "in.parquet", base_url=sim.base_url,
                        input={"keep_columns": ["n"]})
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = read_results(tmp_path / "out")
        assert len(df) == 2500 and df["id"].is_unique
        assert df["n"].dtype.kind == "i"
        assert sorted(df["n"]) == list(range(2500))

    def test_rerun_skips_answered_rows(self, tmp_path: Path, sim: SimThread) -> None:
        """Running the same job again sends nothing and keeps one row per id."""
        data = write_jsonl(tmp_path / "in.jsonl", review_rows(200))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url)
        assert run_cli("run", str(job), "--quiet").returncode == 0
        assert run_cli("run", str(job), "--quiet").returncode == 0
        assert sim.counters.requests == 200
        assert len(read_results(tmp_path / "out")) == 200

    def test_limit_then_resume_completes_exactly_once(self, tmp_path: Path, sim: SimThread) -> None:
        """--limit sends part of the input; the next run does the rest, each id once."""
        data = write_jsonl(tmp_path / "in.jsonl", review_rows(300))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url)
        assert run_cli("run", str(job), "--quiet", "--limit", "120").returncode == 3  # rows left: rerun
        assert len(read_results(tmp_path / "out")) == 120
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = read_results(tmp_path / "out")
        assert len(df) == 300 and df["id"].is_unique
        assert sim.counters.requests == 300


class TestExitCodes:
    def test_invalid_job_exits_2_and_sends_nothing(self, tmp_path: Path, sim: SimThread) -> None:
        """A typo in the job file is exit 2, names the key and its closest valid name."""
        data = write_jsonl(tmp_path / "in.jsonl", review_rows(10))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, run={"concurency": 4})
        proc = run_cli("run", str(job))
        assert proc.returncode == 2
        assert "run.concurency" in proc.stderr and "concurrency" in proc.stderr
        assert sim.counters.requests == 0

    def test_broken_input_line_exits_2_before_sending(self, tmp_path: Path, sim: SimThread) -> None:
        """A malformed line deep in the input stops the run before the first request."""
        rows = review_rows(2000)
        data = write_jsonl(tmp_path / "in.jsonl", rows)
        lines = data.read_text().splitlines()
        lines[1500] = '{"id": "x", "text": '
        data.write_text("\n".join(lines) + "\n")
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url)
        proc = run_cli("run", str(job))
        assert proc.returncode == 2
        assert ":1501:" in proc.stderr
        assert sim.counters.requests == 0

    def test_duplicate_ids_exit_2_with_line_numbers(self, tmp_path: Path, sim: SimThread) -> None:
        """Repeated ids are reported with where they occur, before anything is sent."""
        rows = review_rows(50)
        rows[40]["id"] = "id-3"
        data = write_jsonl(tmp_path / "in.jsonl", rows)
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url)
        proc = run_cli("run", str(job))
        assert proc.returncode == 2
        assert "'id-3' at line 4, line 41" in proc.stderr
        assert sim.counters.requests == 0

    def test_missing_key_exits_2(self, tmp_path: Path, sim: SimThread) -> None:
        """A provider whose key variable is unset is an invalid job, with the variable named."""
        data = write_jsonl(tmp_path / "in.jsonl", review_rows(5))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, api_key_env="SIM_API_KEY")
        proc = run_cli("run", str(job))
        assert proc.returncode == 2
        assert "SIM_API_KEY" in proc.stderr
        assert sim.counters.requests == 0

    def test_changed_job_over_existing_output_is_refused(self, tmp_path: Path, sim: SimThread) -> None:
        """A different template over the same output is refused with what changed, unless --force."""
        data = write_jsonl(tmp_path / "in.jsonl", review_rows(20))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url)
        assert run_cli("run", str(job), "--quiet").returncode == 0
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, input={"template": "Now {text}"})
        proc = run_cli("run", str(job), "--quiet")
        assert proc.returncode == 2
        assert "template" in proc.stderr and "--force" in proc.stderr
        assert sim.counters.requests == 20


class TestDemo:
    def test_demo_job_runs_on_the_embedded_simulator(self, tmp_path: Path) -> None:
        """jobs/demo.toml needs no key and answers every shipped review once."""
        out = tmp_path / "demo"
        proc = run_cli("run", "jobs/demo.toml", "--output", str(out), "--quiet")
        assert proc.returncode == 0, proc.stderr
        df = read_results(out)
        assert len(df) == 300 and df["id"].is_unique and (df["status"] == "ok").all()
        assert set(df["output"]) <= {"positive", "negative", "neutral"}


def test_python_api(tmp_path: Path, sim: SimThread) -> None:
    """batch.load_job + batch.run work from a script, returning the summary."""
    import batch

    data = write_jsonl(tmp_path / "in.jsonl", review_rows(50))
    job = batch.load_job(write_job(tmp_path, input_path=data, base_url=sim.base_url))
    summary = batch.run(job, quiet=True)
    assert summary.exit_code == 0
    assert summary.rows_ok == 50
    assert summary.usage.requests == 50

