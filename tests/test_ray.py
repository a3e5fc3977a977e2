"""The Ray engine (batch/ray_*.py) on a local Ray cluster started once for this module, against the
simulator over HTTP: the same rows as a local run, exactly once through a worker crash and a driver
kill -9, one global rate limit across workers, and the CLI. Skipped when Ray is not installed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest

import batch
from batch.lock import OutputLock
from batch.sim import SimThread
from tests.conftest import ROOT, run_cli, write_job, write_jsonl

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(180)
Factory = Callable[..., SimThread]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One local cluster for the module: loopback only, no dashboard, no usage stats, more logical CPUs
    than cores (RAY.md: a 2-CPU node deadlocked). Yields its address for CLI runs to join."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def rows(n: int) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "text": f"row {i}"} for i in range(n)]


def results(out: Path) -> pd.DataFrame:
    return ds.dataset(out / "results", format="parquet").to_table().to_pandas()


def sent_twice(sim: SimThread) -> int:
    """Requests the simulator saw for a prompt it had seen before."""
    return sum(n - 1 for n in sim.counters.by_prompt.values() if n > 1)


class TestSameRows:
    def test_ray_and_local_give_the_same_rows(self, cluster: str, tmp_path: Path, sim_factory: Factory) -> None:
        """The same job run locally and on Ray (2 workers) gives the same id, status and output per row."""
        sim = sim_factory(latency_ms=2, faults={"500": 0.05}, seed=3)
        data = write_jsonl(tmp_path / "in.jsonl", rows(300))
        frames = []
        for name, engine in (("local", "local"), ("ray", "ray")):
            job = write_job(tmp_path, input_path=data, base_url=sim.base_url, name=f"{name}.toml",
                            output={"path": str(tmp_path / name)})
            summary = batch.run(batch.load_job(job), quiet=True, engine=engine, ray_workers=2)
            assert summary.exit_code == 0, summary.stop_reason
            assert summary.rows_this_run == 300
            frames.append(results(tmp_path / name).sort_values("id")[["id", "status", "output"]]
                          .reset_index(drop=True))
        pd.testing.assert_frame_equal(frames[0], frames[1])
        assert not (tmp_path / "ray" / "ray").exists()  # the run's shards are gone once its rows are in parts


class TestExactlyOnce:
    def test_worker_crash_and_driver_kill_9(self, cluster: str, tmp_path: Path, sim_factory: Factory) -> None:
        """A worker os._exit()s mid-run and then the driver is killed with -9; a rerun finishes: every id
        exactly once, and no more requests were sent twice than were in flight at the two kills."""
        concurrency = 8
        sim = sim_factory(latency_ms=30)
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(600)), base_url=sim.base_url,
                        run={"concurrency": concurrency}, output={"flush_rows": 50, "flush_seconds": 0.2})
        out = tmp_path / "out"
        env = {**os.environ, "BATCH_TEST_RAY_EXIT_AFTER": "40"}
        proc = subprocess.Popen([sys.executable, "-m", "batch", "run", str(job), "--quiet", "--ray", cluster,
                                 "--ray-workers", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while not (list(out.glob("ray/*/.exited")) and sim.counters.requests > 250):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the worker never crashed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        time.sleep(2)  # Ray ends the dead driver's worker actors
        assert list(out.glob("ray/*/*.shard")), "the answered rows wait in shards"
        again = run_cli("run", str(job), "--quiet", "--ray", cluster, timeout=150)
        assert again.returncode == 0, again.stderr
        table = results(out)
        assert len(table) == 600 and table["id"].is_unique and (table["status"] == "ok").all()
        assert sim.counters.requests >= 600
        assert sent_twice(sim) <= 2 * concurrency, sent_twice(sim)
        assert not (out / "ray").exists()


    def test_retry_errors_on_ray_replaces_rows_in_place(self, cluster: str, tmp_path: Path,
                                                         sim_factory: Factory) -> None:
        """--retry-errors on a Ray run's output redoes its error rows on Ray: still one row per id."""
        sim = sim_factory(latency_ms=2, faults={"content_filter": 0.3}, seed=5)
        job = batch.load_job(write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(200)),
                                       base_url=sim.base_url))
        first = batch.run(job, quiet=True, engine="ray")
        assert first.exit_code == 1 and first.rows_error > 0
        again = batch.run(job, quiet=True, engine="ray", retry_errors=True)
        assert again.rows_this_run == first.rows_error and again.rows_error < first.rows_error
        table = results(tmp_path / "out")
        assert len(table) == 200 and table["id"].is_unique


class TestGlobalLimit:
    def test_four_workers_share_one_limit(self, cluster: str, tmp_path: Path, sim_factory: Factory) -> None:
        """300 rows on 4 workers against 1,800 rpm enforced per second too: no second over 30 admitted
        requests, fewer than 1% 429s."""
        rpm = 1800
        sim = sim_factory(latency_ms=5, requests_per_minute=rpm, limit_windows=(1,))
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(300)), base_url=sim.base_url,
                        models=[{"provider": "local", "model": "openai/gpt-4.1-mini", "requests_per_minute": rpm}],
                        run={"concurrency": 32})
        started = time.monotonic()
        summary = batch.run(batch.load_job(job), quiet=True, engine="ray", ray_workers=4)
        wall = time.monotonic() - started
        assert summary.exit_code == 0, summary.stop_reason
        c = sim.counters
        assert c.peak("requests", 1) <= rpm / 60
        assert c.rate_limited < 0.01 * 300, c.rate_limited
        assert wall > 300 / (rpm / 60) - 2  # paced, not bursted


class TestBudget:
    def test_cost_cap_holds_across_workers(self, cluster: str, tmp_path: Path, sim_factory: Factory) -> None:
        """max_cost_usd is one cap for all workers: the run stops with exit 3, billed no more than the cap."""
        sim = sim_factory(latency_ms=5)
        cap = 0.002
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(400)), base_url=sim.base_url,
                        run={"max_cost_usd": cap})
        summary = batch.run(batch.load_job(job), quiet=True, engine="ray", ray_workers=3)
        assert summary.exit_code == 3 and "budget reached" in (summary.stop_reason or "")
        assert 0 < summary.rows_total < 400
        assert sim.counters.billed_usd <= cap
        assert len(results(tmp_path / "out")) == summary.rows_total


class TestCli:
    def test_locked_output_exits_2_and_stats_reads_a_ray_output(self, cluster: str, tmp_path: Path,
                                                                sim: SimThread) -> None:
        """--ray on an output another run holds exits 2 and sends nothing; `batch stats` reads a Ray run's
        output as any other."""
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(40)), base_url=sim.base_url)
        out = tmp_path / "out"
        with OutputLock(out):
            held = run_cli("run", str(job), "--quiet", "--ray", cluster)
        assert held.returncode == 2, held.stderr
        assert sim.counters.requests == 0
        done = run_cli("run", str(job), "--quiet", "--ray", cluster)
        assert done.returncode == 0, done.stderr
        stats = run_cli("stats", str(out))
        assert stats.returncode == 0, stats.stderr
        assert "40 rows, 40 ok" in stats.stdout
