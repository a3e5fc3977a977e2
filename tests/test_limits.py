"""limits.py: budgets that never exceed a sliding minute, steered by what the provider says."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest

from batch.limits import ModelLimiter, SteerableLimiter
from batch.sim import SimThread
from tests.conftest import run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]


def admissions(per_minute: float, seconds: float, amount: Callable[[int], float] = lambda i: 1.0) -> list[tuple[float, float]]:
    """Greedy acquisitions on a virtual clock (the loop's time is the only fake), 1 ms steps."""
    async def go() -> list[tuple[float, float]]:
        loop = asyncio.get_running_loop()
        now = [0.0]
        loop.time = lambda: now[0]  # type: ignore[method-assign]
        lim = SteerableLimiter(per_minute)
        got: list[tuple[float, float]] = []
        while now[0] < seconds:
            while lim.has_capacity(min(amount(len(got)), lim.max_rate)):
                a = amount(len(got))
                await lim.take(a)  # returns at once: the capped part fits, the rest becomes debt
                got.append((now[0], a))
            now[0] += 0.001
        return got

    return asyncio.run(go())


def peak_window(events: list[tuple[float, float]], window: float = 60.0) -> float:
    peak = total = 0.0
    j = 0
    for t, a in events:
        total += a
        while events[j][0] <= t - window:
            total -= events[j][1]
            j += 1
        peak = max(peak, total)
    return peak


class TestBucketSizing:
    @pytest.mark.parametrize("rpm", [60, 1200, 10_000])
    def test_no_sliding_minute_exceeds_the_limit(self, rpm: int) -> None:
        """Over three virtual minutes no 60 s window admits more than the limit, yet >= 97% of it flows."""
        events = admissions(rpm, 180)
        assert peak_window(events) <= rpm
        assert len(events) >= 0.97 * rpm * 3

    def test_whole_minute_bucket_would_double_the_limit(self) -> None:
        """The classic mistake, shown: capacity = a minute's budget admits ~2x in one window."""
        from aiolimiter import AsyncLimiter

        async def go() -> int:
            loop = asyncio.get_running_loop()
            now = [0.0]
            loop.time = lambda: now[0]  # type: ignore[method-assign]
            naive = AsyncLimiter(600, 60)
            n = 0
            while now[0] < 60:
                while naive.has_capacity():
                    await naive.acquire()
                    n += 1
                now[0] += 0.001
            return n

        assert asyncio.run(go()) > 1150

    def test_tokens_of_varied_size_stay_under_the_limit(self) -> None:
        """Token amounts, some larger than the bucket (their excess is owed), keep every window
        under the limit plus one request's excess, at >= 95% use."""
        sizes = [50, 3000, 400, 120, 900]
        events = admissions(60_000, 180, lambda i: sizes[i % len(sizes)])
        assert peak_window(events) <= 60_000 + max(sizes)
        assert sum(a for _, a in events) >= 0.95 * 60_000 * 3

    def test_lowering_the_rate_never_strands_a_waiter(self) -> None:
        """A waiter for a large amount still gets through after the rate is cut (once a deadlock)."""
        async def go() -> None:
            lim = SteerableLimiter(120_000)
            await lim.take(lim.max_rate)  # bucket full
            waiter = asyncio.create_task(lim.take(900))
            await asyncio.sleep(0.01)
            lim.set_rate(30_000)
            await asyncio.wait_for(waiter, timeout=5)

        asyncio.run(go())


class TestSteering:
    def test_a_stated_limit_below_ours_is_adopted(self) -> None:
        """x-ratelimit-limit-requests lower than the job's becomes the rate; higher is ignored."""
        asyncio.run(self._adopted())

    async def _adopted(self) -> None:
        lim = ModelLimiter(2400, None)
        lim.observe(1200, None, 500, None, 1.0, None)
        assert lim.requests is not None and lim.requests.per_minute == 1200
        lim.observe(5000, None, 500, None, 1.0, None)
        assert lim.requests.per_minute == 1200

    def test_nothing_remaining_pauses_until_reset(self) -> None:
        """remaining 0 with reset 2 s pauses the model for 2 s."""
        now = [100.0]
        lim = ModelLimiter(None, 1000, clock=lambda: now[0])
        lim.observe(None, None, None, 0, None, 2.0)
        assert lim.paused_until == pytest.approx(102.0)

    def test_429_drops_to_what_was_admitted_once_per_episode(self) -> None:
        """Without a stated limit, a burst of 429s lowers the rate once, to what the provider admitted
        in the last minute; after a calm spell it only probes slowly beyond that limit."""
        asyncio.run(self._aimd())

    async def _aimd(self) -> None:
        now = [1000.0]
        lim = ModelLimiter(1000, 90_000, clock=lambda: now[0])
        for i in range(600):  # the provider answered 600 requests of 100 tokens in the last 60 s
            now[0] = 1000.0 + i * 0.1
            lim.sent()
            lim.admitted(100)
        for _ in range(20):
            lim.on_rate_limited(0.5, None, None, None)
        assert lim.requests is not None and lim.tokens is not None
        assert lim.requests.per_minute == pytest.approx(0.97 * 600)
        assert lim.tokens.per_minute == pytest.approx(0.97 * 60_000)
        found = lim.requests.per_minute
        for _ in range(200):
            now[0] += 1.0
            lim.settle(0, 0)
        assert found < lim.requests.per_minute <= found * (1 + 0.005 * 11) <= 1000

    def test_an_early_429_halves_then_recovers_fast(self) -> None:
        """A 429 before much was answered halves the rate (no limit was measured) and the rate
        climbs back to the job's ceiling within a minute or so."""
        asyncio.run(self._early())

    async def _early(self) -> None:
        now = [50.0]
        lim = ModelLimiter(1000, None, clock=lambda: now[0])
        lim.on_rate_limited(0.5, None, None, None)
        assert lim.requests is not None and lim.requests.per_minute == 500
        for _ in range(90):
            now[0] += 1.0
            lim.settle(0, 0)
        assert lim.requests.per_minute == 1000

    def test_discovers_a_limit_it_was_never_told(self) -> None:
        """A model with no configured limit gets one from its first 429."""
        lim = ModelLimiter(None, None)
        assert not lim.limited
        lim.sent()
        lim.on_rate_limited(0.1, None, None, None)
        assert lim.limited and lim.requests is not None


def results(tmp: Path) -> pd.DataFrame:
    return ds.dataset(tmp / "out" / "results", format="parquet").to_table().to_pandas()


ROWS = [{"id": f"r{i}", "text": f"row {i}"} for i in range(60)]


class TestAgainstTheSimulator:
    def test_job_at_the_real_limit_gets_no_429(self, tmp_path: Path, sim_factory: Factory) -> None:
        """Job limit = provider limit (sliding 60 s): no 429 at all, and no window over the limit."""
        sim = sim_factory(requests_per_minute=900)
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", ROWS), base_url=sim.base_url,
                        models=[{"provider": "local", "model": "m", "requests_per_minute": 900}])
        assert run_cli("run", str(job), "--quiet").returncode == 0
        assert sim.counters.rate_limited == 0
        assert sim.counters.peak("offered", 60) <= 900

    def test_header_limit_below_the_jobs_is_adopted(self, tmp_path: Path, sim_factory: Factory) -> None:
        """Job says 3,000 rpm, the provider's headers say 600: batch slows to 600 before a 429 storm."""
        sim = sim_factory(requests_per_minute=600, rate_limit_style="openai")
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", ROWS[:40]), base_url=sim.base_url,
                        models=[{"provider": "local", "model": "m", "requests_per_minute": 3000}])
        assert run_cli("run", str(job), "--quiet").returncode == 0
        assert sim.counters.rate_limited == 0
        assert sim.counters.peak("offered", 60) <= 600

    def test_rate_limited_rows_wait_for_their_model(self, tmp_path: Path, sim_factory: Factory) -> None:
        """By default a 429 is not a failure: every row is answered by the primary, none spills."""
        sim = sim_factory(requests_per_minute=15, window_seconds=1.0, rate_limit_style="bare")
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", ROWS), base_url=sim.base_url,
                        models=[{"provider": "local", "model": "primary"}, {"provider": "local", "model": "backup"}])
        assert run_cli("run", str(job), "--quiet", timeout=90).returncode == 0
        df = results(tmp_path)
        assert (df["model"] == "primary").all() and sim.counters.by_model["backup"] == 0
        assert sim.counters.rate_limited > 0
        stats = pd.read_parquet(tmp_path / "out" / "stats.parquet").set_index("model")
        assert stats.loc["primary", "rate_limited"] == sim.counters.rate_limited

    def test_spill_on_rate_limit_uses_the_next_model(self, tmp_path: Path, sim_factory: Factory) -> None:
        """run.spill_on_rate_limit: rows move to the next model while the primary is saturated."""
        sim = sim_factory(requests_per_minute=15, window_seconds=1.0, rate_limit_style="bare")
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", ROWS), base_url=sim.base_url,
                        models=[{"provider": "local", "model": "primary"}, {"provider": "local", "model": "backup"}],
                        run={"spill_on_rate_limit": True})
        assert run_cli("run", str(job), "--quiet", timeout=90).returncode == 0
        df = results(tmp_path)
        assert (df["status"] == "ok").all()
        assert (df["model"] == "backup").any() and (df["model"] == "primary").any()
        assert (df.loc[df["model"] == "backup", "fallback_level"] == 1).all()
