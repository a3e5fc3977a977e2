"""Overnight safety with real processes and real signals: kill -9, SIGINT, damaged parts,
budget stops, full disks and retried rows all end with every id exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from batch.sim import SimThread
from tests.conftest import ROOT, run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]
N = 3000


def rows(n: int = N) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "text": f"row {i}"} for i in range(n)]


def results(out: Path) -> pd.DataFrame:
    return ds.dataset(out / "results", format="parquet").to_table().to_pandas()


def start(job: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "batch", "run", str(job), "--quiet", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_parts(out: Path, timeout: float = 30) -> None:
    """Block until the run has written at least one part (bounded)."""
    deadline = time.monotonic() + timeout
    while not list((out / "results").glob("part-*.parquet")):
        assert time.monotonic() < deadline, "no part written"
        time.sleep(0.02)


class TestKill:
    @pytest.mark.parametrize("trial", range(3))
    def test_kill_9_then_resume(self, tmp_path: Path, sim_factory: Factory, trial: int) -> None:
        """kill -9 at a random moment, then rerun: every id once, all ok; at most the rows not yet on
        disk (2 x flush_rows) plus the requests in flight were asked twice, and none three times."""
        sim = sim_factory(latency_ms=3)
        flush_rows, concurrency = 200, 16
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows()), base_url=sim.base_url,
                        output={"flush_rows": flush_rows, "flush_seconds": 0.5}, run={"concurrency": concurrency})
        proc = start(job)
        wait_for_parts(tmp_path / "out")
        time.sleep(random.Random(trial).uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        done_before = len(results(tmp_path / "out"))
        assert done_before < N, "the run finished before the kill; the trial proves nothing"
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path / "out")
        assert len(df) == N and df["id"].is_unique and (df["status"] == "ok").all()
        asked = sim.counters.by_prompt
        assert max(asked.values()) <= 2
        twice = sum(1 for v in asked.values() if v == 2)
        assert twice <= 2 * flush_rows + concurrency  # the buffer, the part being written, the requests in flight
        stats = pd.read_parquet(tmp_path / "out" / "stats.parquet")
        assert stats["run_id"].nunique() == 2 and stats["ok"].sum() == N  # the killed run's kept answers count


class TestSignals:
    def test_sigint_flushes_and_resume_asks_nothing_twice(self, tmp_path: Path, sim_factory: Factory) -> None:
        """SIGINT: in-flight rows finish, everything is flushed, exit 3; the rerun completes and the
        simulator never saw the same row twice."""
        sim = sim_factory(latency_ms=3)
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows()), base_url=sim.base_url,
                        output={"flush_rows": 500, "flush_seconds": 30})
        proc = start(job)
        deadline = time.monotonic() + 30
        while sim.counters.requests < 300:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, err
        assert "interrupted" in err
        manifest_runs = __import__("orjson").loads((tmp_path / "out" / "manifest.json").read_bytes())["runs"]
        assert manifest_runs[-1]["outcome"] == "stopped"
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path / "out")
        assert len(df) == N and df["id"].is_unique
        assert max(sim.counters.by_prompt.values()) == 1

    def test_second_sigint_stops_at_once_keeping_parts(self, tmp_path: Path, sim_factory: Factory) -> None:
        """A second signal during the grace period ends the run at once; the parts on disk stay valid."""
        sim = sim_factory(latency_ms=3, faults={"hang": 0.05}, hang_seconds=60)
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows()), base_url=sim.base_url,
                        output={"flush_rows": 100}, run={"timeout_seconds": 50})
        proc = start(job)
        wait_for_parts(tmp_path / "out")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
        assert proc.returncode == 3
        df = results(tmp_path / "out")
        assert df["id"].is_unique and len(df) > 0


class TestDamage:
    def test_half_written_part_is_set_aside_not_read(self, tmp_path: Path, sim_factory: Factory) -> None:
        """A truncated part file is detected, set aside with a warning, and its rows redone."""
        sim = sim_factory()
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(400)), base_url=sim.base_url,
                        output={"flush_rows": 100})
        assert run_cli("run", str(job), "--quiet", "--limit", "300").returncode == 3
        parts = sorted((tmp_path / "out" / "results").glob("part-*.parquet"))
        victim = parts[1]
        victim.write_bytes(victim.read_bytes()[:-300])
        proc = run_cli("run", str(job), "--quiet")
        assert proc.returncode == 0
        assert "damaged" in proc.stderr and victim.name in proc.stderr
        df = results(tmp_path / "out")
        assert len(df) == 400 and df["id"].is_unique

    def test_leftover_temporary_file_is_ignored(self, tmp_path: Path, sim_factory: Factory) -> None:
        """A .tmp file from a crash mid-write is never part of the dataset."""
        sim = sim_factory()
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(50)), base_url=sim.base_url)
        assert run_cli("run", str(job), "--quiet").returncode == 0
        (tmp_path / "out" / "results" / ".part-00007.parquet.tmp").write_bytes(b"PAR1 half")
        assert len(results(tmp_path / "out")) == 50
        assert run_cli("run", str(job), "--quiet").returncode == 0


class TestBudget:
    def test_budget_stop_then_resume_with_more(self, tmp_path: Path, sim_factory: Factory) -> None:
        """max_cost_usd stops the run (exit 3) without passing the cap by more than what was in flight;
        raising it resumes; every id once and stats cost equals the rows' cost."""
        sim = sim_factory()
        data = write_jsonl(tmp_path / "in.jsonl", rows(600))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, run={"max_cost_usd": 0.004, "concurrency": 8},
                        models=[{"provider": "local", "model": "openai/gpt-4.1-mini"}])
        proc = run_cli("run", str(job), "--quiet")
        assert proc.returncode == 3 and "budget" in proc.stderr
        first = results(tmp_path / "out")
        assert 0 < len(first) < 600
        worst = (20 * 0.4 + 8 * 1.6) / 1e6  # one request's reservation, generously
        assert first["cost_usd"].sum() <= 0.004 + 8 * worst
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, run={"max_cost_usd": 1.0},
                        models=[{"provider": "local", "model": "openai/gpt-4.1-mini"}])
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path / "out")
        assert len(df) == 600 and df["id"].is_unique
        stats = pd.read_parquet(tmp_path / "out" / "stats.parquet")
        assert stats["cost_usd"].sum() == pytest.approx(df["cost_usd"].sum(), abs=1e-12)
        assert max(sim.counters.by_prompt.values()) == 1


class TestRetryAndCompact:
    def test_retry_errors_replaces_rows_keeping_one_per_id(self, tmp_path: Path, sim_factory: Factory) -> None:
        """Rows that failed are redone with --retry-errors; the dataset still has one row per id."""
        sim = sim_factory(context_windows={"m": 40})
        data = write_jsonl(tmp_path / "in.jsonl", rows(100) + [{"id": "long", "text": "w " * 100}])
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, models=[{"provider": "local", "model": "m"}])
        assert run_cli("run", str(job), "--quiet").returncode == 1
        assert results(tmp_path / "out").set_index("id").loc["long", "status"] == "error"
        sim.config.context_windows = {}
        proc = run_cli("run", str(job), "--quiet", "--retry-errors")
        assert proc.returncode == 0, proc.stderr
        df = results(tmp_path / "out")
        assert len(df) == 101 and df["id"].is_unique and (df["status"] == "ok").all()

    def test_retry_truncated_redoes_length_rows(self, tmp_path: Path, sim_factory: Factory) -> None:
        """--retry-truncated redoes rows cut at max_tokens (here with a larger max_tokens, via --force)."""
        sim = sim_factory()
        data = write_jsonl(tmp_path / "in.jsonl", rows(30))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, request={"max_tokens": 2})
        assert run_cli("run", str(job), "--quiet").returncode == 0
        assert (results(tmp_path / "out")["finish_reason"] == "length").all()
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, request={"max_tokens": 50})
        assert run_cli("run", str(job), "--quiet", "--retry-truncated", "--force").returncode == 0
        df = results(tmp_path / "out")
        assert len(df) == 30 and df["id"].is_unique and (df["finish_reason"] == "stop").all()

    def test_compact_writes_one_file(self, tmp_path: Path, sim_factory: Factory) -> None:
        """batch compact writes the dataset as a single Parquet file with every row."""
        sim = sim_factory()
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(500)), base_url=sim.base_url,
                        output={"flush_rows": 100})
        assert run_cli("run", str(job), "--quiet").returncode == 0
        assert run_cli("compact", str(tmp_path / "out")).returncode == 0
        table = pq.read_table(tmp_path / "out" / "results.parquet")
        assert table.num_rows == 500 and len(set(table["id"].to_pylist())) == 500


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real filesystem that really fills up (needs root, as CI and dev machines have)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_stops_cleanly_and_resumes(tmp_path: Path, sim_factory: Factory, tiny_disk: Path) -> None:
    """ENOSPC mid-run: a clear message, exit 3, earlier parts intact; after freeing space the rerun completes."""
    sim = sim_factory()
    data = write_jsonl(tmp_path / "in.jsonl", rows(2000))
    job = write_job(tmp_path, input_path=data, base_url=sim.base_url, output={"path": str(tiny_disk / "out"),
                                                                              "flush_rows": 100})
    assert run_cli("run", str(job), "--quiet", "--limit", "300").returncode == 3
    ballast = tiny_disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk ...
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(ballast, max(0, ballast.stat().st_size - 12_000))  # ... leaving room for a part or two
    proc = run_cli("run", str(job), "--quiet")
    assert proc.returncode == 3, proc.stderr
    assert "No space left on device" in proc.stderr and "redone on resume" in proc.stderr
    df = results(tiny_disk / "out")
    assert df["id"].is_unique and len(df) >= 300
    ballast.unlink()
    assert run_cli("run", str(job), "--quiet").returncode == 0
    df = results(tiny_disk / "out")
    assert len(df) == 2000 and df["id"].is_unique


def test_fresh_forgets_a_killed_ray_runs_shards_and_the_old_report(tmp_path: Path, sim: SimThread) -> None:
    """--fresh starts over: the answers a killed Ray driver left in OUT/ray are deleted with the rest, not
    folded into the fresh results (they once were: --fresh then skipped those rows as done), and so is the
    old report.html."""
    from batch.ray_shards import ShardWriter, run_folder
    from batch.result import Result

    job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(30)), base_url=sim.base_url)
    assert run_cli("run", str(job), "--quiet").returncode == 0
    old = results(tmp_path / "out").set_index("id").loc["r0"]
    stale = Result(id="r0", status="ok", output="STALE", parsed=None, finish_reason="stop", model=str(old["model"]),
                   provider=str(old["provider"]), fallback_level=0, attempts=1, prompt_tokens=1, completion_tokens=1,
                   cached_tokens=None, reasoning_tokens=None, cost_usd=0.0, cost_source=None, latency_ms=1.0,
                   error_type=None, error_message=None, request_hash=str(old["request_hash"]), cached=False,
                   billed_prompt_tokens=1, billed_completion_tokens=1, lane="online", batch_id=None,
                   response_body=None, keep=())
    writer = ShardWriter(run_folder(tmp_path / "out", "20260101T000000Z-dead00") / "w0.shard")
    writer.append(stale)
    writer.close()
    (tmp_path / "out" / "report.html").write_text("<html>old</html>")
    before = sim.counters.requests
    assert run_cli("run", str(job), "--quiet", "--fresh").returncode == 0
    df = results(tmp_path / "out")
    assert len(df) == 30 and df["id"].is_unique and "STALE" not in set(df["output"])
    assert sim.counters.requests - before == 30  # every row asked again: none skipped as done
    assert not (tmp_path / "out" / "ray").exists() and not (tmp_path / "out" / "report.html").exists()
