"""The command line's answers on outputs that are half made, busy, or not outputs at all; argument checks."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from batch.sim import SimThread
from tests.conftest import ROOT, run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]


def rows(n: int) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "text": f"row {i}"} for i in range(n)]


class TestStatsBeforeARunEnds:
    def test_stats_without_stats_file_reads_results(self, tmp_path: Path, sim: SimThread) -> None:
        """An output whose run has not ended (no stats.parquet yet: a first run, or kill -9) is not
        'not an output': stats says so, counts the rows in results/, and exits 0."""
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(30)), base_url=sim.base_url)
        assert run_cli("run", str(job), "--quiet").returncode == 0
        out = tmp_path / "out"
        (out / "stats.parquet").unlink()  # as a run killed before its end leaves it
        stats = run_cli("stats", str(out))
        assert stats.returncode == 0, stats.stderr
        assert "no stats yet: stats.parquet is written when a run ends; 30 rows in results/ so far" in stats.stdout
        assert "30 ok, 0 error" in stats.stdout
        as_json = run_cli("stats", str(out), "--json")
        assert as_json.returncode == 0 and orjson.loads(as_json.stdout)["results"] == {"rows": 30, "ok": 30,
                                                                                      "error": 0}

    def test_stats_on_a_directory_that_is_not_an_output(self, tmp_path: Path) -> None:
        stats = run_cli("stats", str(tmp_path))
        assert stats.returncode == 2 and "not a batch output" in stats.stderr


class TestValidateSeesTheLock:
    def test_validate_blocks_on_an_output_another_process_holds(self, tmp_path: Path, sim: SimThread) -> None:
        """run exits 2 on an output another batch process holds; validate says so too (exit 2), not 'ready to
        run', and leaves the holder's lock alone."""
        from batch.lock import OutputLock

        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(5)), base_url=sim.base_url)
        with OutputLock(tmp_path / "out", "batch run job.toml"):
            checked = run_cli("validate", str(job))
            assert checked.returncode == 2, checked.stdout
            assert "blocking:" in checked.stdout and "in use by another batch process (pid" in checked.stdout
            assert "batch run job.toml" in checked.stdout and "ready to run" not in checked.stdout
            assert run_cli("run", str(job), "--quiet").returncode == 2
        assert run_cli("validate", str(job)).returncode == 0  # released: ready again


class TestFreshStopHint:
    def test_ctrl_c_on_a_fresh_run_says_rerun_without_fresh(self, tmp_path: Path, sim_factory: Factory) -> None:
        """The same command of a --fresh run deletes what it wrote: its stop hint says to rerun without --fresh."""
        sim = sim_factory(latency_ms=50)
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(400)), base_url=sim.base_url,
                        run={"concurrency": 2})
        proc = subprocess.Popen([sys.executable, "-m", "batch", "run", str(job), "--fresh", "--quiet"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while sim.counters.requests < 10:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, err
        assert "rerun without --fresh to resume" in err and "rerun the same command" not in err

    def test_abbreviated_options_are_refused(self, tmp_path: Path) -> None:
        """`--fr` is not `--fresh`: abbreviations are an argparse error (exit 2), not a silent delete."""
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(2)), base_url="http://127.0.0.1:9")
        done = run_cli("run", str(job), "--fr")
        assert done.returncode == 2 and "unrecognized arguments: --fr" in done.stderr
        assert not (tmp_path / "out").exists()


class TestPastDeadline:
    @pytest.mark.parametrize(("deadline", "said"), [
        ("2020-01-01T07:00:00+01:00", "'2020-01-01T07:00:00+01:00' (2020-01-01 06:00:00 UTC) has already passed"),
        ("0m", "'0m' is a duration of 0")])
    def test_a_deadline_that_leaves_no_time_is_a_job_error(self, tmp_path: Path, deadline: str, said: str) -> None:
        """validate refused nothing and run only said 'not enough time before the deadline'."""
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(2)),
                        base_url="http://127.0.0.1:9", run={"deadline": deadline})
        for command in ("validate", "run"):
            done = run_cli(command, str(job))
            assert done.returncode == 2 and f"run.deadline: {said}" in done.stderr, done.stderr

    @pytest.mark.parametrize("deadline", ["07:00", "07:00:00", "23:59:59"])
    def test_a_time_of_day_is_the_next_one(self, tmp_path: Path, sim: SimThread, deadline: str) -> None:
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(2)), base_url=sim.base_url,
                        run={"deadline": deadline})
        done = run_cli("validate", str(job))
        assert done.returncode == 0, done.stdout + done.stderr


class TestOnlyOutputs:
    @pytest.mark.parametrize("command", ["report", "status", "compact", "stats"])
    def test_a_directory_without_manifest_is_refused_and_left_untouched(self, tmp_path: Path, command: str) -> None:
        """report wrote report.html into any directory; compact left a .batch.lock in one. Now: exit 2, and
        nothing written."""
        empty = tmp_path / "empty"
        empty.mkdir()
        done = run_cli(command, str(empty))
        assert done.returncode == 2, done.stdout
        assert f"{empty} is not a batch output (no manifest.json); give the output.path of a job" in done.stderr
        assert list(empty.iterdir()) == []

    @pytest.mark.parametrize("command", ["report", "status", "compact", "stats"])
    def test_a_job_file_names_its_output(self, tmp_path: Path, command: str) -> None:
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(2)), base_url="http://127.0.0.1:9")
        done = run_cli(command, str(job))
        assert done.returncode == 2
        assert f"is a job file, not an output directory; its output is {tmp_path / 'out'}" in done.stderr
        assert f"batch {command} {tmp_path / 'out'}" in done.stderr


def test_a_negative_limit_is_refused(tmp_path: Path, sim: SimThread) -> None:
    """`--limit -5` meant no limit: the whole input was sent. It is a usage error now; nothing is sent."""
    job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(5)), base_url=sim.base_url)
    done = run_cli("run", str(job), "--limit", "-5")
    assert done.returncode == 2 and "--limit -5: expected a number of rows, 0 or more" in done.stderr
    assert sim.counters.requests == 0 and not (tmp_path / "out").exists()


def test_ray_workers_without_ray_is_refused(tmp_path: Path, sim: SimThread) -> None:
    """`--ray-workers 2` without `--ray` ran locally without a word; it is a usage error now, nothing sent."""
    job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(5)), base_url=sim.base_url)
    done = run_cli("run", str(job), "--ray-workers", "2")
    assert done.returncode == 2 and "--ray-workers works with --ray only" in done.stderr
    assert sim.counters.requests == 0 and not (tmp_path / "out").exists()


def test_a_changed_input_is_said_in_words(tmp_path: Path, sim: SimThread) -> None:
    """The refusal printed the fingerprint's raw dict (name, size, sample_hash); now names and sizes."""
    data = write_jsonl(tmp_path / "rev.jsonl", rows(300))
    job = write_job(tmp_path, input_path=data, base_url=sim.base_url)
    assert run_cli("run", str(job), "--quiet").returncode == 0
    before = data.stat().st_size
    write_jsonl(data, rows(301))
    for command in ("run", "validate"):
        done = run_cli(command, str(job), "--quiet") if command == "run" else run_cli(command, str(job))
        said = done.stderr + done.stdout
        assert done.returncode == 2
        assert (f"the input changed since this output was started (rev.jsonl: {before:,} -> {data.stat().st_size:,} "
                "bytes); --force to continue with it (rows already answered are kept), --fresh to start over") in said
        assert "sample_hash" not in said and "{" not in said
    forced = run_cli("run", str(job), "--quiet", "--force")
    assert forced.returncode == 0 and sim.counters.requests == 301


def test_a_misspelt_keep_column_in_jsonl_is_a_job_error(tmp_path: Path, sim: SimThread) -> None:
    """`keep_columns = ["prodcut"]` on JSONL made an all-null column; as for template fields, the keys the
    input has decide, with the closest one offered. Parquet is checked against its schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = write_jsonl(tmp_path / "in.jsonl", [{**r, "product": "p"} for r in rows(4)])
    pq.write_table(pa.Table.from_pylist([{**r, "product": "p"} for r in rows(4)]), tmp_path / "in.parquet")
    for path in (data, tmp_path / "in.parquet"):
        job = write_job(tmp_path, input_path=path, base_url=sim.base_url, input={"keep_columns": ["prodcut"]})
        checked, ran = run_cli("validate", str(job)), run_cli("run", str(job), "--quiet")
        for said in (checked.stdout, ran.stderr):
            assert "input.keep_columns: no column 'prodcut' in the input; did you mean 'product'?" in said
        assert checked.returncode == ran.returncode == 2
    assert sim.counters.requests == 0
    good = write_job(tmp_path, input_path=data, base_url=sim.base_url, input={"keep_columns": ["product"]})
    assert run_cli("run", str(good), "--quiet").returncode == 0


def test_error_rows_of_a_retired_model_point_to_retry_errors(tmp_path: Path, sim_factory: Factory) -> None:
    """Every row an error (a retired model), then the model fixed: the refusal and the --force summary say
    the rows have results, ok or error, and that --retry-errors redoes the error rows."""
    sim = sim_factory(retired=("old/model",))
    data = write_jsonl(tmp_path / "in.jsonl", rows(6))
    old = write_job(tmp_path, input_path=data, base_url=sim.base_url,
                    models=[{"provider": "local", "model": "old/model"}])
    assert run_cli("run", str(old), "--quiet").returncode == 1
    fixed = write_job(tmp_path, input_path=data, base_url=sim.base_url)
    refused = run_cli("run", str(fixed), "--quiet")
    assert refused.returncode == 2
    assert "(6 of its rows are error rows, kept as they are: add --retry-errors to redo them)" in refused.stderr
    forced = run_cli("run", str(fixed), "--quiet", "--force")
    assert forced.returncode == 1, forced.stderr
    assert "6 skipped, they have results (ok or error)" in forced.stdout and "answered before" not in forced.stdout
    assert "the dataset's 6 error rows are kept; --retry-errors redoes them" in forced.stdout
    assert run_cli("run", str(fixed), "--quiet", "--force", "--retry-errors").returncode == 0


def test_one_of_a_thing_is_singular(tmp_path: Path, sim: SimThread) -> None:
    """'1 rows', '1 requests', '1 lines' no more: validate, the summary, compact and export."""
    job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(1)), base_url=sim.base_url)
    assert "job file ok; 1 row in" in run_cli("validate", str(job)).stdout
    done = run_cli("run", str(job), "--quiet")
    assert done.returncode == 0
    assert "this run   1 row: 1 ok, 0 error" in done.stdout and "           1 request, " in done.stdout
    assert ": 1 request, 1 answered" in done.stdout
    out = tmp_path / "out"
    assert run_cli("compact", str(out)).stdout.startswith("wrote 1 row to")
    exported = run_cli("export", str(out), str(tmp_path / "x.jsonl")).stdout
    assert exported.startswith("wrote 1 line to") and "(0 of them error lines)" in exported
    again = run_cli("run", str(job), "--quiet")
    assert "this run   0 rows: 0 ok, 0 error; 1 skipped" in again.stdout and "0 requests" in again.stdout


def test_one_error_row_is_kept_singular(tmp_path: Path, sim_factory: Factory) -> None:
    sim = sim_factory(retired=("old/model",))
    data = write_jsonl(tmp_path / "in.jsonl", rows(1))
    job = write_job(tmp_path, input_path=data, base_url=sim.base_url,
                    models=[{"provider": "local", "model": "old/model"}])
    assert run_cli("run", str(job), "--quiet").returncode == 1
    again = run_cli("run", str(job), "--quiet")
    assert "the dataset's 1 error row is kept; --retry-errors redoes it" in again.stdout, again.stdout
