"""The response cache: a second run sends nothing and costs nothing; replay fails only what changed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.dataset as ds

from batch.sim import SimThread
from tests.conftest import ROOT, run_cli, write_job, write_jsonl

ANSWER_COLUMNS = ["id", "status", "output", "finish_reason", "model", "prompt_tokens", "completion_tokens"]


def rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"review {i} (positive/negative)"} for i in range(start, start + n)]


def results(out: Path) -> pd.DataFrame:
    df = ds.dataset(out / "results").to_table().to_pandas()
    return df.sort_values("id").reset_index(drop=True)


def cache_job(tmp: Path, data: Path, sim: SimThread, name: str, **kw: Any) -> Path:
    run = {"cache": "read-write", "cache_path": str(tmp / "cache.sqlite3"), **kw.pop("run", {})}
    return write_job(tmp, input_path=data, base_url=sim.base_url, name=name,
                     output={"path": str(tmp / name.removesuffix(".toml"))}, run=run, **kw)


class TestReadWrite:
    def test_a_second_run_sends_nothing_costs_nothing_and_answers_the_same(self, tmp_path: Path,
                                                                          sim: SimThread) -> None:
        data = write_jsonl(tmp_path / "in.jsonl", rows(1000))
        first = cache_job(tmp_path, data, sim, "first.toml")
        assert run_cli("run", str(first), "--quiet").returncode == 0
        assert sim.counters.requests == 1000
        # another job (its own output directory) shares the cache: answers are keyed by content
        second = cache_job(tmp_path, data, sim, "second.toml")
        proc = run_cli("run", str(second), "--quiet", "--json")
        assert proc.returncode == 0, proc.stderr
        assert sim.counters.requests == 1000  # not one more
        a, b = results(tmp_path / "first"), results(tmp_path / "second")
        pd.testing.assert_frame_equal(a[ANSWER_COLUMNS], b[ANSWER_COLUMNS])
        assert not a["cached"].any() and b["cached"].all()
        assert b["cost_usd"].sum() == 0 and (b["cost_source"] == "cache").all() and (b["attempts"] == 0).all()
        stats = pd.read_parquet(tmp_path / "second" / "stats.parquet")
        assert stats["cache_hits"].sum() == 1000 and stats["requests"].sum() == 0 and stats["cost_usd"].sum() == 0
        assert '"cache_hits": 1000' in proc.stdout
        wal = tmp_path / "cache.sqlite3-wal"
        assert not wal.exists() or wal.stat().st_size == 0  # checkpointed at close: the .sqlite3 file is complete

    def test_nondeterministic_requests_are_sent_again_unless_the_job_says_so(self, tmp_path: Path,
                                                                            sim: SimThread) -> None:
        data = write_jsonl(tmp_path / "in.jsonl", rows(50))
        warm = {"temperature": 0.7, "max_tokens": 8}
        for name in ("a.toml", "b.toml"):
            assert run_cli("run", str(cache_job(tmp_path, data, sim, name, request=warm)), "-q").returncode == 0
        assert sim.counters.requests == 100  # temperature 0.7 and no seed: never cached by default
        for name in ("c.toml", "d.toml"):
            job = cache_job(tmp_path, data, sim, name, request=warm, run={"cache_nondeterministic": True})
            assert run_cli("run", str(job), "-q").returncode == 0
        assert sim.counters.requests == 150  # c sent and stored them, d was answered from the cache
        seeded = cache_job(tmp_path, data, sim, "e.toml", request={**warm, "seed": 7})
        assert run_cli("run", str(seeded), "-q").returncode == 0
        assert run_cli("run", str(seeded), "-q", "--fresh").returncode == 0
        assert sim.counters.requests == 200  # a seed makes a request deterministic: sent once

    def test_concurrent_writers_and_a_kill_leave_a_sound_cache(self, tmp_path: Path, sim_factory: Any) -> None:
        """Two runs share the cache file at once; a third is killed -9 mid-run. The file stays sound."""
        sim = sim_factory(latency_ms=20)
        jobs = []
        for k in range(3):
            data = write_jsonl(tmp_path / f"in{k}.jsonl", rows(400, start=k * 400))
            jobs.append(cache_job(tmp_path, data, sim, f"job{k}.toml", run={"concurrency": 8}))
        procs = [subprocess.Popen([sys.executable, "-m", "batch", "run", str(j), "-q"], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for j in jobs]
        deadline = time.monotonic() + 30
        while sim.counters.requests < 600 and time.monotonic() < deadline:  # about halfway through each
            time.sleep(0.05)
        os.kill(procs[2].pid, signal.SIGKILL)
        assert [p.wait(timeout=60) for p in procs[:2]] == [0, 0]
        procs[2].wait(timeout=10)
        db = sqlite3.connect(tmp_path / "cache.sqlite3")
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = db.execute("SELECT count(*) FROM responses").fetchone()[0]
        db.close()
        assert 800 <= stored <= 1200
        sent = sim.counters.requests
        for j in jobs[:2]:  # everything the two finished runs stored replays without a request
            proc = run_cli("run", str(j), "-q", "--fresh", "--cache", "replay")
            assert proc.returncode == 0, proc.stderr
        assert sim.counters.requests == sent


class TestReplay:
    def test_a_changed_prompt_fails_only_its_row_and_no_key_is_needed(self, tmp_path: Path,
                                                                      sim_factory: Any) -> None:
        sim = sim_factory(api_key="sk-sim-secret")
        data = write_jsonl(tmp_path / "in.jsonl", rows(200))
        job = cache_job(tmp_path, data, sim, "job.toml", api_key_env="SIM_API_KEY")
        assert run_cli("run", str(job), "-q", env={"SIM_API_KEY": "sk-sim-secret"}).returncode == 0
        changed = rows(200)
        changed[42]["text"] = "review 42 (positive/negative), edited"
        write_jsonl(data, changed)
        sent = sim.counters.requests
        proc = run_cli("run", str(job), "-q", "--fresh", "--cache", "replay")  # no SIM_API_KEY: none needed
        assert proc.returncode == 1, proc.stderr
        assert sim.counters.requests == sent
        df = results(tmp_path / "job")
        bad = df[df["status"] != "ok"]
        assert list(bad["id"]) == ["r42"]
        assert bad["error_type"].item() == "cache_miss"
        assert "was never recorded, or it changed since" in bad["error_message"].item()
        assert "--cache read-write" in bad["error_message"].item()
        assert df[df["status"] == "ok"]["cached"].all()

    def test_replay_without_a_cache_file_is_an_invalid_job(self, tmp_path: Path, sim: SimThread) -> None:
        data = write_jsonl(tmp_path / "in.jsonl", rows(3))
        job = cache_job(tmp_path, data, sim, "job.toml", run={"cache": "replay"})
        proc = run_cli("run", str(job), "-q")
        assert proc.returncode == 2
        assert "no cache at" in proc.stderr and "read-write" in proc.stderr
        assert sim.counters.requests == 0
        assert not (tmp_path / "job").exists()
        checked = run_cli("validate", str(job))
        assert checked.returncode == 2 and "blocking: run.cache = \"replay\": no cache at" in checked.stdout


def test_cache_info_and_prune(tmp_path: Path, sim: SimThread) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", rows(30))
    job = cache_job(tmp_path, data, sim, "job.toml")
    assert run_cli("run", str(job), "-q").returncode == 0
    where = ["--cache-path", str(tmp_path / "cache.sqlite3")]
    info = run_cli("cache", "info", *where, "--json")
    assert info.returncode == 0, info.stderr
    assert '"entries": 30' in info.stdout and '"openai/gpt-4.1-mini": 30' in info.stdout
    kept = run_cli("cache", "prune", "--older-than-days", "1", *where)
    assert "deleted 0 answers" in kept.stdout
    gone = run_cli("cache", "prune", "--older-than-days", "0", *where)
    assert "deleted 30 answers" in gone.stdout and "0 answers" in gone.stdout
    assert run_cli("run", str(job), "-q", "--fresh").returncode == 0  # recorded again, at its cost
    assert sim.counters.requests == 60
