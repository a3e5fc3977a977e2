"""Limits and failures as real providers behave them (WIRE.md): sub-minute windows, full-reset headers,
requests too large for a limit, flex refusals, a server that is not there, and stopping with nothing in flight."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pandas as pd
import pyarrow.dataset as ds
import pytest

from batch.sim import SimConfig, Simulator, SimThread
from batch.store import part_files
from tests.conftest import ROOT, TEST_KEY, run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]


def rows(n: int, words: int = 1) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "text": f"row {i} " + "word " * words} for i in range(n)]


def results(tmp: Path) -> pd.DataFrame:
    return ds.dataset(tmp / "out" / "results", format="parquet").to_table().to_pandas().set_index("id")


class TestSimulatorWindows:
    def test_a_per_minute_limit_is_also_enforced_per_second_and_peaks_are_reported(self) -> None:
        """600 rpm enforced per second too: 30 requests at once get 10 through, the rest 429 with OpenAI's
        wording and headers whose reset is the time to a *full* reset; peaks are reported per window length."""
        async def go() -> tuple[list[int], list[dict[str, Any]], dict[str, Any]]:
            async with Simulator(SimConfig(requests_per_minute=600, limit_windows=(1.0,))) as sim, \
                    aiohttp.ClientSession() as s:
                async def one(i: int) -> tuple[int, dict[str, Any]]:
                    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]})
                    async with s.post(sim.base_url + "/chat/completions", data=body) as r:
                        return r.status, {"body": orjson.loads(await r.read()), "headers": dict(r.headers)}
                answers = await asyncio.gather(*(one(i) for i in range(30)))
                return [a[0] for a in answers], [a[1] for a in answers], sim.counters.as_dict()

        statuses, answers, counters = asyncio.run(go())
        assert statuses.count(200) == 10 and statuses.count(429) == 20
        refused = next(a for a, st in zip(answers, statuses) if st == 429)
        assert "Please try again in" in refused["body"]["error"]["message"]
        assert "Limit 600" in refused["body"]["error"]["message"]
        reset = refused["headers"]["x-ratelimit-reset-requests"]
        assert reset.endswith("s") and not reset.endswith("ms")  # ~60 s: the whole window, not one request
        assert counters["peaks"]["requests"] == {"60": 10, "1": 10}
        assert counters["peaks"]["offered"]["1"] == 30


class TestTooLarge:
    def test_a_prompt_over_the_token_limit_falls_back_without_being_sent(self, tmp_path: Path,
                                                                         sim_factory: Factory) -> None:
        """Known before sending: a request larger than the primary's whole token limit goes to the next model
        at once, and the primary is not slowed for the other rows."""
        sim = sim_factory(context_windows={"backup": 200_000})
        data = write_jsonl(tmp_path / "in.jsonl", rows(20) + [{"id": "huge", "text": "word " * 70_000}])
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url,
                        models=[{"provider": "local", "model": "primary", "tokens_per_minute": 60_000},
                                {"provider": "local", "model": "backup"}])
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path)
        assert df.loc["huge", "model"] == "backup" and df.loc["huge", "fallback_level"] == 1
        assert (df.drop(index="huge")["model"] == "primary").all()
        assert sim.counters.by_model["primary"] == 20

    def test_a_request_too_large_429_falls_back_and_never_pauses_the_model(self, tmp_path: Path,
                                                                           sim_factory: Factory) -> None:
        """OpenAI's 429 "Request too large" (the provider's limit, unknown to the job) is a row-level failure:
        the row falls back, no wait, no rate cut; every other row stays on the primary."""
        sim = sim_factory(tokens_per_minute=2000)
        data = write_jsonl(tmp_path / "in.jsonl", rows(8) + [{"id": "huge", "text": "word " * 3000}])
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url,
                        models=[{"provider": "local", "model": "primary"}, {"provider": "local", "model": "backup"}])
        assert run_cli("run", str(job), "--quiet").returncode in (0, 1)
        df = results(tmp_path)
        assert df.loc["huge", "error_type"] in ("request_too_large", None)
        assert sim.counters.too_large >= 1 and sim.counters.by_model["primary"] <= 9 + sim.counters.rate_limited
        stats = pd.read_parquet(tmp_path / "out" / "stats.parquet").set_index("model")
        assert stats.loc["primary", "rate_limited"] == sim.counters.rate_limited  # "too large" is not one


class TestFlex:
    def test_flex_refusals_fall_back_to_the_standard_tier_and_are_counted_as_such(self, tmp_path: Path,
                                                                                  sim_factory: Factory) -> None:
        """The same model at the flex tier, then at the standard tier: a flex refusal (429, not billed) sends
        the row to the standard tier; stats count flex refusals, not rate limits; flex answers cost half."""
        sim = sim_factory(flex_refusals=0.3, seed=3)
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(300)), base_url=sim.base_url,
                        models=[{"provider": "local", "model": "openai/gpt-4.1-mini", "service_tier": "flex"},
                                {"provider": "local", "model": "openai/gpt-4.1-mini"}])
        proc = run_cli("run", str(job), "--quiet")
        assert proc.returncode == 0, proc.stderr
        df = results(tmp_path)
        flexed = df[df["fallback_level"] == 0]
        fell = df[df["fallback_level"] == 1]
        assert len(fell) == sim.counters.flex_refusals > 50 and len(flexed) + len(fell) == 300
        stats = pd.read_parquet(tmp_path / "out" / "stats.parquet")
        flex_row = stats[stats["model"] == "openai/gpt-4.1-mini@flex"].iloc[0]
        assert flex_row["flex_refusals"] == sim.counters.flex_refusals and flex_row["rate_limited"] == 0
        per_token = (flexed["cost_usd"] / (flexed["prompt_tokens"] * 0.4 + flexed["completion_tokens"] * 1.6)).mean()
        assert per_token * 1e6 == pytest.approx(0.5, rel=0.01)


class TestUnreachable:
    def test_nothing_listening_stops_the_run_naming_the_url(self, tmp_path: Path) -> None:
        """No server at the URL and nothing ever answered: exit 3 after run.unreachable_seconds, naming the URL
        (never the key), and no row recorded as failed, so the rerun sends them all."""
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(50)),
                        base_url="http://127.0.0.1:9/v1", api_key_env="SIM_API_KEY",
                        run={"unreachable_seconds": 2, "concurrency": 4})
        t0 = time.monotonic()
        proc = run_cli("run", str(job), "--quiet", env={"SIM_API_KEY": TEST_KEY}, timeout=60)
        assert proc.returncode == 3, proc.stderr
        assert "cannot reach http://127.0.0.1:9/v1/chat/completions" in proc.stderr
        assert "Is the server running" in proc.stderr and TEST_KEY not in proc.stderr + proc.stdout
        assert time.monotonic() - t0 < 30  # not the ten minutes of give_up_seconds
        assert part_files(tmp_path / "out" / "results") == []  # no row was recorded as failed
        stats = pd.read_parquet(tmp_path / "out" / "stats.parquet")  # but every attempt is a failed attempt
        assert stats["errors"].sum() == stats["requests"].sum() > 0
        assert "failed attempts (requests, not rows): connection" in run_cli("run", str(job), env={
            "SIM_API_KEY": TEST_KEY}, timeout=60).stdout


def test_a_signal_with_nothing_in_flight_ends_the_grace_at_once(tmp_path: Path, sim_factory: Factory) -> None:
    """SIGTERM while every row waits out a long Retry-After: nothing is in flight, so the run stops at once
    (not after the 30 s grace), exit 3, and a rerun completes."""
    sim = sim_factory(schedule={"*": ["503:20", "ok"]})
    job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(20)), base_url=sim.base_url,
                    run={"backoff_max_seconds": 30})
    proc = subprocess.Popen([sys.executable, "-m", "batch", "run", str(job), "--quiet"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while sim.counters.requests < 20:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)  # within the grace of 30 s it would not have ended
    assert proc.returncode == 3 and "interrupted" in err
    sim.config.schedule = {}
    assert run_cli("run", str(job), "--quiet").returncode == 0
