"""The cost cap holds across kill -9: spend is journaled as it is billed, not only when a run ends."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds

from batch.sim import SimThread
from tests.conftest import ROOT, run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]
PRICES = {"price_input_per_million": 1.0, "price_output_per_million": 2.0}  # the simulator's for unknown models


def rows(n: int) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "text": f"row {i} " + "word " * (i % 7)} for i in range(n)]


def start(job: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "batch", "run", str(job), "--quiet"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_capped_job_killed_twice_stays_under_the_cap(tmp_path: Path, sim_factory: Factory) -> None:
    """kill -9 twice, then resume to the budget stop: everything the simulator billed stays within the cap
    plus the worst case of the requests in flight at each kill and at the stop."""
    sim = sim_factory(latency_ms=15)
    cap, concurrency, max_tokens = 0.02, 8, 8
    job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(3000)), base_url=sim.base_url,
                    models=[{"provider": "local", "model": "m", **PRICES}],
                    request={"temperature": 0, "max_tokens": max_tokens},
                    run={"max_cost_usd": cap, "concurrency": concurrency},
                    output={"flush_rows": 500, "flush_seconds": 30})  # answers stay unflushed: only the journal has them
    rng = random.Random(7)
    for _ in range(2):
        before = sim.counters.requests
        proc = start(job)
        deadline = time.monotonic() + 30
        while sim.counters.requests < before + rng.randint(150, 300):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    final = run_cli("run", str(job), "--quiet")
    assert final.returncode == 3 and "budget reached" in final.stderr
    prompt_estimate = 40  # the longest prompt here: ~7 words + framing, estimated at 4 characters per token
    worst = (prompt_estimate * PRICES["price_input_per_million"] + max_tokens * PRICES["price_output_per_million"]) / 1e6
    assert sim.counters.billed_usd <= cap + 3 * concurrency * worst
    assert sim.counters.billed_usd > cap * 0.8  # the cap was reached, not stopped far short of it
    stats = pd.read_parquet(tmp_path / "out" / "stats.parquet")
    assert stats["cost_usd"].sum() <= sim.counters.billed_usd + 1e-12  # killed runs' spend is in stats too
    assert stats["cost_usd"].sum() >= sim.counters.billed_usd - 2 * concurrency * worst


def test_a_cap_with_a_model_of_unknown_price_is_refused_at_load(tmp_path: Path, sim_factory: Factory) -> None:
    """A model priced at $0 would let requests past the cap: the job is refused, naming how to give a price."""
    sim = sim_factory()
    job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(10)), base_url=sim.base_url,
                    models=[{"provider": "local", "model": "m"}], run={"max_cost_usd": 1.0})
    proc = run_cli("run", str(job), "--quiet")
    assert proc.returncode == 2
    assert "price_input_per_million" in proc.stderr and "check_models" in proc.stderr
    assert sim.counters.requests == 0


def test_live_prices_satisfy_the_cap(tmp_path: Path, sim_factory: Factory) -> None:
    """With check_models the provider's model list gives the price, and the capped job runs."""
    sim = sim_factory(models=("m",))
    job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(10)), base_url=sim.base_url,
                    models=[{"provider": "local", "model": "m"}], run={"max_cost_usd": 1.0, "check_models": True})
    assert run_cli("run", str(job), "--quiet").returncode == 0


def test_repairs_reserve_their_real_size(tmp_path: Path, sim_factory: Factory) -> None:
    """Repair requests carry the conversation so far; the cap counts that, so invalid answers cannot
    carry a run past it by more than what was in flight."""
    sim = sim_factory(invalid_answers=0.6, seed=2)
    cap, concurrency = 0.01, 8
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": "long text " * 40} for i in range(2000)])
    job = write_job(tmp_path, input_path=data, base_url=sim.base_url, request={"temperature": 0, "max_tokens": 5},
                    input={"template": "Label (yes/no): {text}"},
                    models=[{"provider": "local", "model": "m", **PRICES}],
                    run={"max_cost_usd": cap, "concurrency": concurrency},
                    extra={"output_format": {"labels": ["yes", "no"], "max_repairs": 3}})
    proc = run_cli("run", str(job), "--quiet")
    assert proc.returncode == 3 and "budget reached" in proc.stderr
    repair_prompt = 140 * 2  # the prompt, the answer and the repair message, at its largest
    worst = (repair_prompt * PRICES["price_input_per_million"] + 5 * PRICES["price_output_per_million"]) / 1e6
    assert sim.counters.billed_usd <= cap + concurrency * worst
    df = ds.dataset(tmp_path / "out" / "results").to_table().to_pandas()
    assert df["id"].is_unique
