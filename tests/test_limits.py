"""limits.py and steer.py: budgets that never exceed their window, steered only by evidence.

The Gate is pure (any clock), so its properties are checked by a small discrete-event
simulation on a virtual clock: many waiters arriving at random times with random token
counts, pauses ordered at random moments, replies settling later with what the provider
counted. The simulation is the only fake; everything else is the real Gate.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch.limits import WINDOW, Gate, ModelLimiter, Pace, Ticket, Waiter
from batch.sim import SimThread
from batch.steer import CALM_SECONDS, Steering
from tests.conftest import run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]


@dataclass
class Run:
    """What the simulated provider saw: admissions with the tokens it counted, in grant order."""

    admitted: list[tuple[float, float, float]] = field(default_factory=list)  # (time, request=1, tokens)
    order: list[int] = field(default_factory=list)  # arrival number of each granted waiter
    pauses: list[tuple[float, float]] = field(default_factory=list)


def simulate(rpm: float | None, tpm: float | None, arrivals: list[tuple[float, float, float]],
             pauses: list[tuple[float, float]], latency: float = 0.2) -> Run:
    """Drive a Gate: ``arrivals`` are (time, reserved tokens, counted/reserved); ``pauses`` (time, seconds).
    A granted request's tokens are settled ``latency`` later with what the provider counted."""
    gate = Gate(Pace(rpm) if rpm else None, Pace(tpm) if tpm else None)
    run = Run()
    events: list[tuple[float, int, str, object]] = []
    for i, (t, tokens, ratio) in enumerate(arrivals):
        heapq.heappush(events, (t, i, "arrive", (i, tokens, ratio)))
    for j, (t, seconds) in enumerate(pauses):
        heapq.heappush(events, (t, 10**6 + j, "pause", seconds))
    waiters: dict[int, tuple[int, float]] = {}
    seq = 2 * 10**6
    timer = -1  # like the real limiter: one timer at a time; a wake for an older timer is stale
    while events:
        now, _, kind, data = heapq.heappop(events)
        if kind == "wake" and data != timer:
            continue
        if kind == "arrive":
            i, tokens, ratio = data  # type: ignore[misc]
            w = Waiter(tokens)
            waiters[id(w)] = (i, ratio)
            gate.queue.append(w)
        elif kind == "pause":
            gate.paused_until = max(gate.paused_until, now + data)  # type: ignore[operator]
            run.pauses.append((now, now + data))  # type: ignore[operator]
        elif kind == "settle":
            ticket, counted = data  # type: ignore[misc]
            gate.settle(now, ticket, counted)
        granted, wait = gate.grant(now)
        for w in granted:
            i, ratio = waiters.pop(id(w))
            assert w.granted is not None
            counted = w.tokens * ratio
            run.admitted.append((now, 1.0, counted))
            run.order.append(i)
            seq += 1
            heapq.heappush(events, (now + latency, seq, "settle", (w.granted, counted)))
        if wait is not None:
            seq += 1
            timer = seq
            heapq.heappush(events, (now + wait, seq, "wake", timer))
    return run


def peak(events: list[tuple[float, float]], window: float) -> float:
    """The largest total of any half-open window (t - window, t]."""
    best = total = 0.0
    j = 0
    for t, a in events:
        total += a
        while events[j][0] <= t - window:
            total -= events[j][1]
            j += 1
        best = max(best, total)
    return best


arrival_lists = st.lists(st.tuples(st.floats(0, 200), st.floats(1, 3000), st.floats(0.2, 1.0)),
                         min_size=1, max_size=250).map(lambda xs: sorted(xs))
pause_lists = st.lists(st.tuples(st.floats(0, 200), st.floats(0.01, 20)), max_size=5)


class TestGateProperties:
    @settings(max_examples=150, deadline=None)
    @given(rpm=st.sampled_from([6, 60, 600, 6000]), tpm=st.sampled_from([None, 3000, 20_000, 100_000]),
           arrivals=arrival_lists, pauses=pause_lists)
    def test_no_window_of_the_limit_ever_over_it(self, rpm: int, tpm: int | None,
                                                  arrivals: list[tuple[float, float, float]],
                                                  pauses: list[tuple[float, float]]) -> None:
        """Random arrivals, sizes (some larger than a second's worth of tokens) and pauses: no 60 s window
        holds more requests or tokens than the limit, nothing is granted during a pause, and requests are
        granted in the order they arrived (both budgets taken in one step)."""
        if tpm is not None:
            arrivals = [(t, min(tokens, tpm * 0.9), r) for t, tokens, r in arrivals]
        run = simulate(rpm, tpm, arrivals, pauses)
        assert len(run.admitted) == len(arrivals)  # everyone got through in the end
        assert peak([(t, r) for t, r, _ in run.admitted], WINDOW) <= rpm
        if tpm is not None:
            assert peak([(t, k) for t, _, k in run.admitted], WINDOW) <= tpm + 1e-6
        assert run.order == sorted(run.order)
        for t, _, _ in run.admitted:
            assert not any(start < t < end - 1e-9 for start, end in run.pauses), "granted during a pause"

    @settings(max_examples=40, deadline=None)
    @given(rpm=st.sampled_from([60, 1200, 60_000]), window=st.sampled_from([1.0, 0.1]))
    def test_no_burst_under_sub_minute_enforcement(self, rpm: int, window: float) -> None:
        """Continuous demand, unit requests: every window of 1 s (or 100 ms) holds at most its share of the
        per-minute limit plus one request, so a provider enforcing it per second sees the rate, not spikes."""
        demand = [(i * 0.001, 1.0, 1.0) for i in range(int(rpm / 60 * 30))]  # 30 s of demand up front
        run = simulate(rpm, None, demand, [(5.0, 2.0)])
        assert peak([(t, 1.0) for t, _, _ in run.admitted], window) <= rpm / 60 * window + 1

    @pytest.mark.parametrize("rpm", [60, 1200, 10_000])
    def test_continuous_demand_runs_at_the_limit(self, rpm: int) -> None:
        """With requests always waiting, at least 99% of the limit flows over three minutes."""
        demand = [(0.0, 1.0, 1.0)] * int(rpm * 3.2)
        run = simulate(rpm, None, demand, [])
        within = sum(1 for t, _, _ in run.admitted if t < 180)
        assert within >= 0.99 * rpm * 3

    def test_varied_prompts_use_the_token_limit(self) -> None:
        """Token budget, prompts from 20 to 1,500 tokens counted at 60% of what was reserved: at least 95%
        of the limit flows, and no 60 s window is over it."""
        sizes = [20, 1500, 300, 800, 60, 1200, 450]
        demand = [(0.0, float(sizes[i % len(sizes)]), 0.6) for i in range(6000)]
        run = simulate(None, 60_000, demand, [])
        counted = sum(k for t, _, k in run.admitted if t < 180)
        assert counted >= 0.95 * 60_000 * 3
        assert peak([(t, k) for t, _, k in run.admitted], WINDOW) <= 60_000

    def test_a_large_prompt_holds_the_smaller_ones_behind_it(self) -> None:
        """A prompt owing tokens does not let later, smaller requests pass the request budget and queue up
        to go out in a burst (once: 87 requests in a 60 s window at 60 rpm)."""
        arrivals = [(0.0, 5000.0, 1.0)] + [(0.01 * i, 10.0, 1.0) for i in range(1, 300)]
        run = simulate(60, 6000, arrivals, [])
        assert peak([(t, 1.0) for t, _, _ in run.admitted], WINDOW) <= 60
        assert run.order == sorted(run.order)


class TestModelLimiter:
    def test_many_concurrent_waiters_are_paced_and_a_pause_holds_them(self) -> None:
        """200 tasks acquire at once at 1,200 rpm: they go one per 50 ms; a pause holds those already
        waiting; a cancelled waiter does not block the ones behind it."""
        async def go() -> list[float]:
            lim = ModelLimiter(1200, None)
            times: list[float] = []

            async def one() -> None:
                await lim.acquire(10)
                times.append(time.monotonic())

            tasks = [asyncio.create_task(one()) for _ in range(40)]
            await asyncio.sleep(0.3)
            tasks[-1].cancel()
            lim.pause(0.5)
            paused_at = time.monotonic()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert not [t for t in times if paused_at + 0.01 < t < paused_at + 0.49]
            return times

        times = asyncio.run(asyncio.wait_for(go(), 10))
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(times) == 39 and min(gaps) >= 0.045


class TestSteering:
    def steer(self, rpm: float | None = None, tpm: float | None = None) -> tuple[Steering, list[float]]:
        now = [1000.0]
        lim = ModelLimiter(rpm, tpm, clock=lambda: now[0])
        return Steering(lim, rpm, tpm, clock=lambda: now[0]), now

    def test_a_stated_limit_below_ours_is_adopted(self) -> None:
        """x-ratelimit-limit-requests lower than the job's becomes the rate; higher is ignored."""
        s, _ = self.steer(2400)
        s.observe(1200, None, 500, None, 1.0, None)
        assert s.limiter.gate.limit("requests") == 1200
        s.observe(5000, None, 500, None, 1.0, None)
        assert s.limiter.gate.limit("requests") == 1200

    def test_nothing_remaining_holds_about_one_unit_not_a_full_reset(self) -> None:
        """remaining 0 with a reset of 6m0s (the time to a *full* reset) holds the model ~one request's time."""
        s, now = self.steer(600)
        s.observe(600, None, 0, None, 360.0, None)
        assert s.limiter.gate.paused_until == pytest.approx(now[0] + 0.1)

    def test_a_scattered_429_without_evidence_changes_nothing(self) -> None:
        """An upstream's 429 (Retry-After only, no headers) neither pauses nor slows the model."""
        s, now = self.steer(1000)
        for i in range(50):
            now[0] += 0.02
            s.answered(100)
        assert not s.rate_limited(1.0, evidence=False, scope=None, limit_requests=None, limit_tokens=None)
        assert s.limiter.gate.paused_until == 0 and s.limiter.gate.limit("requests") == 1000

    def test_clustered_429s_are_evidence_and_cut_to_what_was_admitted(self) -> None:
        """Many 429s within seconds, a good share of the answers: the model pauses and its rate drops to
        what the provider admitted, once per episode, never below it."""
        s, now = self.steer(3000)
        for i in range(100):  # 10 s at 600 rpm
            now[0] = 1000.0 + i * 0.1
            s.answered(100)
        for _ in range(30):
            now[0] += 0.01
            s.rate_limited(0.5, evidence=False, scope=None, limit_requests=None, limit_tokens=None)
        assert s.limiter.gate.limit("requests") == pytest.approx(600 * 0.97, rel=0.15)
        assert s.limiter.gate.paused_until > now[0]

    def test_recovery_after_429s_stop_takes_seconds(self) -> None:
        """After a cut to half without a measurement, the rate is back at the job's within ~15 s of calm."""
        s, now = self.steer(1000)
        s.rate_limited(0.5, evidence=True, scope="requests", limit_requests=None, limit_tokens=None)
        assert s.limiter.gate.limit("requests") == 500
        now[0] += CALM_SECONDS
        for _ in range(15):
            now[0] += 1.0
            s.answered(10)
        assert s.limiter.gate.limit("requests") == 1000

    def test_429s_stating_the_limit_we_keep_cut_and_headers_do_not_undo_it(self) -> None:
        """500 rpm counted per second admits 8 a second: 429s that say "Limit 500" while we keep 500 trim the
        rate, and the same limit stated again on every answer does not climb back into them (it
        once did: 36% of requests were 429s); probing goes no further than the stated limit."""
        s, now = self.steer(500)
        for i in range(80):  # 10 s at 480 rpm
            now[0] = 1000.0 + i * 0.125
            s.answered(10)
            s.observe(500, None, 100, None, 1.0, None)
        s.rate_limited(0.1, evidence=True, scope="requests", limit_requests=500, limit_tokens=None)
        cut = s.limiter.gate.limit("requests")
        assert cut is not None and cut < 0.98 * 500
        for i in range(1, 40):  # 10 calm seconds, headers stating 500 on every answer
            now[0] += 0.25
            s.answered(10)
            s.observe(500, None, 100, None, 1.0, None)
        limit = s.limiter.gate.limit("requests")
        assert limit is not None and cut <= limit < 0.99 * 500
        for _ in range(600):
            now[0] += 1.0
            s.answered(10)
        assert s.limiter.gate.limit("requests") == 500

    def test_429s_in_the_first_second_of_a_token_limited_model_invent_no_request_limit(self) -> None:
        """A cluster of bare 429s before anything could be measured halves the token budget and leaves the
        unlimited request budget alone (it was once set to 30 rpm, and the run crawled for minutes)."""
        s, now = self.steer(None, 120_000)
        for _ in range(3):
            now[0] += 0.1
            s.answered(500)
        for _ in range(10):
            now[0] += 0.01
            s.rate_limited(1.0, evidence=False, scope=None, limit_requests=None, limit_tokens=None)
        assert s.limiter.gate.limit("requests") is None and s.limiter.gate.limit("tokens") == 60_000

    def test_a_cut_measures_only_seconds_the_model_was_not_paused(self) -> None:
        """What the provider admitted is measured over whole seconds with answers outside pauses: seconds
        spent paused by an earlier episode do not drag the measure (and the cut) down."""
        s, now = self.steer(2400)
        for i in range(40):  # 4 s at 1,200 rpm, then a second-long pause with no answers
            now[0] = 1000.0 + i * 0.05 if i < 20 else 1002.0 + (i - 20) * 0.05
            s.answered(10)
        now[0] = 1003.0
        s.rate_limited(1.0, evidence=True, scope="requests", limit_requests=None, limit_tokens=None)
        now[0] = 1005.0
        for i in range(40):
            now[0] = 1005.0 + i * 0.05
            s.answered(10)
        now[0] = 1008.5
        s.rate_limited(1.0, evidence=True, scope="requests", limit_requests=None, limit_tokens=None)
        assert s.limiter.gate.limit("requests") == pytest.approx(1200 * 0.97, rel=0.05)

    def test_discovers_a_limit_it_was_never_told(self) -> None:
        """A model with no configured limit gets one from a cluster of 429s."""
        s, now = self.steer()
        assert not s.limiter.limited
        for _ in range(10):
            now[0] += 0.05
            s.rate_limited(0.1, evidence=False, scope=None, limit_requests=None, limit_tokens=None)
        assert s.limiter.limited and s.limiter.gate.requests is not None


def test_a_refund_gives_back_the_request_and_its_tokens() -> None:
    """A 429 was not counted by the provider: its request and tokens return to the budgets."""
    gate = Gate(Pace(60), Pace(6000))
    ticket: Ticket = gate.take(0.0, 500)
    assert gate.wait(0.0, 500) > 0
    gate.refund(0.0, ticket)
    assert gate.wait(0.0, 500) == 0


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
