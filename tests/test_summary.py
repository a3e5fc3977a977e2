"""summary.py and progress.py: what the screen shows matches what was written, each figure with its scope."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batch.sim import SimThread
from tests.conftest import run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]
FAST_LOG = {"BATCH_PROGRESS_SECONDS": "0.05"}  # the documented interval of the plain progress line, made short


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"row {i}"} for i in range(n)]


def found(pattern: str, text: str) -> str:
    """The first group of ``pattern`` in ``text``; fails the test if it is not there."""
    match = re.search(pattern, text)
    assert match is not None, (pattern, text)
    return match.group(1)


def log_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[batch] ")]


class TestResumedRun:
    def test_progress_counts_the_dataset_and_ends_on_the_summary(self, tmp_path: Path, sim_factory: Factory) -> None:
        """A resumed run's progress lines count rows of the whole input (60 done before, of 200), and the last
        one shows the summary's own figures."""
        sim = sim_factory(latency_ms=40)  # 140 rows at 4 x 25 rows/s: over a second, several monitor ticks
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(200)), base_url=sim.base_url,
                        run={"concurrency": 4})
        assert run_cli("run", str(job), "--limit", "60").returncode == 3
        proc = run_cli("run", str(job), env=FAST_LOG)
        assert proc.returncode == 0, proc.stderr
        lines = log_lines(proc.stderr)
        assert len(lines) >= 3
        done = [int(found(r"^\[batch\] (\d+)/200 rows", line)) for line in lines]
        assert done == sorted(done) and 60 <= done[0] < 200 and done[-1] == 200
        run_rows = [int(found(r"this run: (\d+) rows", line)) for line in lines]
        assert all(d - r == 60 for d, r in zip(done, run_rows))  # the dataset is what came before plus this run
        out = proc.stdout
        assert "dataset    200 of 200 input rows have a result: 200 ok, 0 error" in out
        assert "this run   140 rows: 140 ok, 0 error; 60 skipped, they have results (ok or error)" in out
        cost = found(r"completion tokens billed, (\$\d+\.\d{6})", out)
        rate = found(r"s, (\d+\.\d) rows/s", out)
        assert lines[-1] == f"[batch] 200/200 rows (100.0%) | this run: 140 rows, ok=140 err=0, {cost}, {rate} rows/s"

    def test_json_says_the_scopes(self, tmp_path: Path, sim: SimThread) -> None:
        """--json carries the dataset and this run apart: rows of the input, left, and this run's rows and ok."""
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(30)), base_url=sim.base_url)
        assert run_cli("run", str(job), "--limit", "10", "--quiet").returncode == 3
        proc = run_cli("run", str(job), "--limit", "5", "--quiet", "--json")
        s = json.loads(proc.stdout)
        assert s["dataset"] == {"rows_input": 30, "rows_with_result": 15, "ok": 15, "error": 0, "rows_left": 15,
                                "error_rows_by_type": {}}
        run = s["this_run"]
        assert (run["rows"], run["ok"], run["error"], run["skipped"], run["requests"]) == (5, 5, 0, 10, 5)
        assert run["cost_usd"] == s["cost_usd"] > 0 and run["failed_attempts"] == {}


class TestFailures:
    def test_error_rows_by_type_with_one_message_each(self, tmp_path: Path, sim_factory: Factory) -> None:
        """Error rows are listed by error_type with a count and one message, in the text and in --json."""
        sim = sim_factory(context_windows={"openai/gpt-4.1-mini": 300})
        long = {"id": "long", "text": "word " * 400}
        data = write_jsonl(tmp_path / "in.jsonl", rows(11) + [long, {"id": "m"}, {"id": "n", "text": None}])
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, input={"template": "{text}"})
        proc = run_cli("run", str(job))
        assert proc.returncode == 1
        out = proc.stdout
        assert "dataset    14 of 14 input rows have a result: 11 ok, 3 error" in out
        assert "this run   14 rows: 11 ok, 3 error" in out
        assert "error rows (dataset), by error_type, one message each:" in out
        assert re.search(r"  context_length\s+1  openai/gpt-4.1-mini: HTTP 400 context_length", out)
        assert re.search(r"  missing_field\s+1  line 13: no field 'text'", out)
        assert re.search(r"  null_field\s+1  line 14: field 'text' is null", out)
        assert "failed attempts (requests, not rows): context_length 1; retried on this model 0" in out
        assert "[batch] 14/14 rows (100.0%) | this run: 14 rows, ok=11 err=3" in proc.stderr
        s = json.loads(run_cli("run", str(job), "--json", "--quiet").stdout)  # nothing left to do: the dataset
        kinds = s["dataset"]["error_rows_by_type"]
        assert kinds["context_length"]["rows"] == 1 and "HTTP 400" in kinds["context_length"]["example"]
        assert kinds["null_field"] == {"rows": 1, "example": "line 14: field 'text' is null"}
        assert s["this_run"]["rows"] == 0 and s["dataset"]["error"] == 3

    def test_failed_requests_are_not_called_failed_rows(self, tmp_path: Path, sim_factory: Factory) -> None:
        """Every row's first request fails and its retry answers: 20 failed attempts, no error rows, said so."""
        sim = sim_factory(schedule={"*": ["500", "ok"]})
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(20)), base_url=sim.base_url,
                        run={"breaker_failures": 100})  # 20 failures in a row are the test, not an outage
        proc = run_cli("run", str(job))
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert "this run   20 rows: 20 ok, 0 error" in out
        assert "40 requests, 20 answered" in out
        assert "failed attempts (requests, not rows): server_error 20; retried on this model 20" in out
        assert "error rows" not in out and "errors:" not in out

    def test_a_model_that_never_answered_has_no_latency(self, tmp_path: Path, sim_factory: Factory) -> None:
        """A primary that only failed shows its requests and failed attempts, and no 'None' latency."""
        sim = sim_factory(down={"primary": float("inf")})
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(20)), base_url=sim.base_url,
                        models=[{"provider": "local", "model": "primary"}, {"provider": "local", "model": "backup"}],
                        run={"max_attempts": 1, "breaker_failures": 100})
        proc = run_cli("run", str(job))
        assert proc.returncode == 0, proc.stderr
        primary = next(line for line in proc.stdout.splitlines() if line.startswith("  local:primary:"))
        assert "None" not in proc.stdout and "0 answered" in primary and "latency" not in primary
        assert "20 rows from the model above" in proc.stdout
