"""router.py: retries, fallback, breakers and fatal stops, against the simulator's faults."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.dataset as ds
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batch.breaker import GO, NO, PROBE, Breaker
from batch.sim import SimThread
from batch.sim_answers import prompt_key
from tests.conftest import TEST_KEY, run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]
PRIMARY = {"provider": "local", "model": "primary"}
BACKUP = {"provider": "local", "model": "backup"}


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"row number {i}"} for i in range(n)]


def results(tmp: Path) -> pd.DataFrame:
    return ds.dataset(tmp / "out" / "results", format="parquet").to_table().to_pandas()


class TestBadNight:
    def test_mixed_faults_every_row_once_and_nothing_after_success(self, tmp_path: Path, sim_factory: Factory) -> None:
        """5,000 rows through 500/503/reset/truncated/error-in-200/hang faults: all ok, each id once,
        and the simulator never sees a request for a row it already answered."""
        sim = sim_factory(seed=3, hang_seconds=30, faults={
            "500": 0.05, "503": 0.02, "reset": 0.01, "truncated": 0.01, "error_in_200": 0.01, "hang": 0.005})
        data = write_jsonl(tmp_path / "in.jsonl", rows(5000))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url,
                        run={"concurrency": 64, "timeout_seconds": 1.0, "max_attempts": 6,
                             "breaker_failures": 1000})
        sim.config.retry_after_seconds = 0.05
        proc = run_cli("run", str(job), "--quiet", timeout=180)
        assert proc.returncode == 0, proc.stderr
        df = results(tmp_path)
        assert len(df) == 5000 and df["id"].is_unique and (df["status"] == "ok").all()
        assert sum(sim.counters.after_success.values()) == 0
        assert sim.counters.faults["hang"] > 0 and sim.counters.faults["reset"] > 0
        # every request the simulator received is accounted for in exactly one row's attempts
        assert df["attempts"].sum() == sim.counters.requests == 5000 + sum(sim.counters.faults.values())

    def test_dead_primary_breaker_bounds_its_requests(self, tmp_path: Path, sim_factory: Factory) -> None:
        """A primary down for the whole run: every row ok from the fallback (level 1), and the
        primary gets at most breaker_failures + concurrency + one probe per cool-down."""
        sim = sim_factory(down={"primary": float("inf")}, latency_ms=2)
        data = write_jsonl(tmp_path / "in.jsonl", rows(2000))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, models=[PRIMARY, BACKUP],
                        run={"concurrency": 16, "breaker_failures": 5, "breaker_cooldown_seconds": 0.5})
        proc = run_cli("run", str(job), "--quiet", "--json")
        assert proc.returncode == 0, proc.stderr
        df = results(tmp_path)
        assert (df["status"] == "ok").all() and (df["fallback_level"] == 1).all() and (df["model"] == "backup").all()
        import json
        wall = json.loads(proc.stdout)["wall_seconds"]
        bound = 5 + 16 + int(wall / 0.5) + 1
        assert sim.counters.by_model["primary"] <= bound

    def test_primary_back_after_outage_takes_rows_again(self, tmp_path: Path, sim_factory: Factory) -> None:
        """A primary down for the first 0.6 s: early rows fall back, later rows return to it."""
        sim = sim_factory(down={"primary": 0.6}, latency_ms=10)
        data = write_jsonl(tmp_path / "in.jsonl", rows(3000))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, models=[PRIMARY, BACKUP],
                        run={"concurrency": 16, "breaker_failures": 3, "breaker_cooldown_seconds": 0.2})
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path)
        df["n"] = df["id"].str[1:].astype(int)
        assert (df["fallback_level"] == 1).any()
        assert (df.sort_values("n").tail(500)["fallback_level"] == 0).all()


class TestFallback:
    def test_context_overflow_falls_back_to_a_larger_window(self, tmp_path: Path, sim_factory: Factory) -> None:
        """A prompt over the primary's window is answered by a fallback with a larger one."""
        sim = sim_factory(context_windows={"primary": 60, "backup": 10_000})
        data = write_jsonl(tmp_path / "in.jsonl", [{"id": "short", "text": "hi"}, {"id": "long", "text": "word " * 200}])
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, models=[PRIMARY, BACKUP])
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path).set_index("id")
        assert df.loc["short", "fallback_level"] == 0
        assert df.loc["long", "fallback_level"] == 1 and df.loc["long", "attempts"] == 2

    def test_context_overflow_without_fallback_is_an_error_row(self, tmp_path: Path, sim_factory: Factory) -> None:
        """With no larger model the row is an error of type context_length, and the run goes on (exit 1)."""
        sim = sim_factory(context_windows={"primary": 60})
        data = write_jsonl(tmp_path / "in.jsonl", [{"id": "long", "text": "word " * 200}] + rows(50))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, models=[PRIMARY])
        assert run_cli("run", str(job), "--quiet").returncode == 1
        df = results(tmp_path).set_index("id")
        assert df.loc["long", "status"] == "error" and df.loc["long", "error_type"] == "context_length"
        assert (df.drop(index="long")["status"] == "ok").all()

    @pytest.mark.parametrize("how", ["retired", "missing", "no_endpoints"])
    def test_a_retired_model_leaves_the_chain_after_at_most_concurrency_requests(
            self, tmp_path: Path, sim_factory: Factory, how: str) -> None:
        """A primary that does not exist (404 model_deprecated, model_not_found, or OpenRouter's "No endpoints
        found") is out of the chain after its first answer: 2,000 rows cost it at most `concurrency` requests,
        every row is answered by the next model, and the run says so."""
        sim = sim_factory(retired=("primary",) if how == "retired" else (),
                          models=("backup",) if how == "missing" else (),
                          no_endpoints=("primary",) if how == "no_endpoints" else (), latency_ms=2)
        data = write_jsonl(tmp_path / "in.jsonl", rows(2000))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, models=[PRIMARY, BACKUP],
                        run={"concurrency": 16})
        proc = run_cli("run", str(job), "--quiet")
        assert proc.returncode == 0, proc.stderr
        df = results(tmp_path)
        assert (df["model"] == "backup").all() and len(df) == 2000
        assert sim.counters.by_model["primary"] <= 16
        assert (df["attempts"] == 1).sum() >= 2000 - 16
        assert "out of the chain for the rest of this run" in proc.stderr

    def test_fallback_off_keeps_every_answer_on_one_model(self, tmp_path: Path, sim_factory: Factory) -> None:
        """run.fallback = false: a failing row is an error, never answered by another model."""
        sim = sim_factory(retired=("primary",))
        data = write_jsonl(tmp_path / "in.jsonl", rows(10))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, models=[PRIMARY, BACKUP],
                        run={"fallback": False})
        assert run_cli("run", str(job), "--quiet").returncode == 1
        assert sim.counters.by_model["backup"] == 0
        assert (results(tmp_path)["error_type"] == "model_not_found").all()

    def test_openrouter_server_side_fallback(self, tmp_path: Path, sim_factory: Factory) -> None:
        """run.server_fallback sends the chain as `models`; the answering model is recorded."""
        sim = sim_factory(retired=("primary",))
        data = write_jsonl(tmp_path / "in.jsonl", rows(10))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, models=[PRIMARY, BACKUP],
                        run={"server_fallback": True})
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path)
        assert (df["model"] == "backup").all() and (df["attempts"] == 1).all() and (df["fallback_level"] == 1).all()

    def test_truncated_answer_can_fall_back(self, tmp_path: Path, sim_factory: Factory) -> None:
        """run.length_is_failure: an answer cut at max_tokens goes to the next model; the last keeps it."""
        sim = sim_factory()
        data = write_jsonl(tmp_path / "in.jsonl", rows(5))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, models=[PRIMARY, BACKUP],
                        request={"max_tokens": 2}, run={"length_is_failure": True})
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path)
        assert (df["model"] == "backup").all() and (df["finish_reason"] == "length").all()


class TestFatal:
    @pytest.mark.parametrize("fault", ["401", "402", "insufficient_quota"])
    def test_account_errors_stop_fast_and_resume_cleanly(self, tmp_path: Path, sim_factory: Factory,
                                                         fault: str) -> None:
        """401/402/quota: exit 3 after fewer requests than the concurrency, no row marked failed;
        once fixed, the same command finishes the job."""
        sim = sim_factory(faults={fault: 1.0})
        data = write_jsonl(tmp_path / "in.jsonl", rows(500))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, run={"concurrency": 32})
        proc = run_cli("run", str(job), "--quiet")
        assert proc.returncode == 3
        assert sim.counters.requests < 32
        assert "refused" in proc.stderr
        out = tmp_path / "out" / "results"
        assert not list(out.glob("*.parquet")) or (results(tmp_path)["status"] == "ok").all()
        sim.config.faults = {}
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path)
        assert len(df) == 500 and df["id"].is_unique

    def test_bad_key_never_appears_anywhere(self, tmp_path: Path, sim_factory: Factory) -> None:
        """A rejected key stops the run within a few requests and is in no output, log or error."""
        sim = sim_factory(api_key="the-right-key")
        data = write_jsonl(tmp_path / "in.jsonl", rows(200))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, api_key_env="SIM_API_KEY",
                        run={"concurrency": 32})
        proc = run_cli("run", str(job), env={"SIM_API_KEY": TEST_KEY})
        assert proc.returncode == 3
        assert sim.counters.requests < 32
        assert TEST_KEY not in proc.stdout + proc.stderr
        for path in (tmp_path / "out").rglob("*"):
            if path.is_file():
                assert TEST_KEY.encode() not in path.read_bytes(), path


class TestTiming:
    def test_each_retry_waits_for_its_own_retry_after(self, tmp_path: Path, sim_factory: Factory) -> None:
        """Retry-After 0.3 s, then 0.6 s: the second and third requests arrive at least that much later."""
        sim = sim_factory(schedule={"*": ["503:0.3", "429:0.6", "ok"]}, record_times=True)
        data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "x"}])
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url)
        assert run_cli("run", str(job), "--quiet").returncode == 0
        (times,) = sim.counters.arrivals.values()
        assert len(times) == 3
        assert times[1] - times[0] >= 0.3
        assert times[2] - times[1] >= 0.6

    def test_stalled_body_is_cut_at_the_deadline_and_retried(self, tmp_path: Path, sim_factory: Factory) -> None:
        """Headers then silence: the attempt ends at timeout_seconds and the retry answers."""
        sim = sim_factory(schedule={"*": ["stall_body", "ok"]}, hang_seconds=60)
        data = write_jsonl(tmp_path / "in.jsonl", rows(3))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, run={"timeout_seconds": 0.5})
        assert run_cli("run", str(job), "--quiet", timeout=60).returncode == 0
        df = results(tmp_path)
        assert (df["status"] == "ok").all() and (df["attempts"] == 2).all()

    def test_backoff_has_full_jitter_under_its_cap(self) -> None:
        """Backoff draws uniformly from [0, min(cap, base * 2^n)] and honours an explicit wait."""
        from batch.router import Policy, Router

        policy = Policy(max_attempts=5, timeout=1, fallback=True, backoff_base=0.5, backoff_max=4.0,
                        max_rate_limit_waits=5, max_tokens=1)
        r = Router(None, [], policy, lambda e: None)  # type: ignore[arg-type]
        draws = [r._backoff(n) for n in range(10) for _ in range(200)]
        assert max(draws) <= 4.0 and min(draws) >= 0
        assert max(r._backoff(0) for _ in range(200)) <= 0.5
        assert r._backoff(3, retry_after=1.25) == 1.25


class TestBreaker:
    def test_opens_after_threshold_and_probes_once_after_cooldown(self) -> None:
        """closed -> open after N failures -> one probe after the cool-down -> closed on success."""
        now = [0.0]
        b = Breaker(threshold=3, cooldown=10, clock=lambda: now[0])
        for _ in range(3):
            assert b.allow() == GO
            b.failure()
        assert b.allow() == NO
        now[0] = 10.0
        assert b.allow() == PROBE and b.allow() == NO  # one probe only
        b.failure(probe=True)
        assert b.allow() == NO
        now[0] = 20.0
        assert b.allow() == PROBE
        b.success(probe=True)
        assert b.allow() == GO and b.allow() == GO

    @given(st.lists(st.tuples(st.sampled_from(["allow", "fail", "ok", "release", "tick"]), st.integers(0, 30)),
                    max_size=200))
    def test_one_probe_means_one(self, events: list[tuple[str, int]]) -> None:
        """Whatever the interleaving of attempts that were in flight when the breaker opened, at most one
        probe is ever out: only the probe's own outcome lets another go."""
        now = [0.0]
        b = Breaker(threshold=3, cooldown=5, clock=lambda: now[0])
        out: list[bool] = []  # attempts in flight: True for the probe
        for event, pick in events:
            if event == "tick":
                now[0] += 1.0
            elif event == "allow":
                verdict = b.allow()
                if verdict != NO:
                    out.append(verdict == PROBE)
            elif out:
                probe = out.pop(pick % len(out))
                {"fail": b.failure, "ok": b.success, "release": b.release}[event](probe=probe)  # type: ignore[operator]
            assert sum(out) <= 1


def test_prompt_key_is_stable() -> None:
    """The simulator's per-prompt counters key on the last message."""
    assert prompt_key([{"role": "user", "content": "x"}]) == prompt_key([{"role": "system", "content": "s"},
                                                                         {"role": "user", "content": "x"}])
