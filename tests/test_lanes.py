"""The batch lane: rows answered through the providers' Batch APIs against a deadline, finished online, exactly
once across lanes and crashes. Every test runs the real CLI against the simulator's Batch APIs."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow.dataset as ds
import pytest

from batch.sim import SimThread
from tests.conftest import ROOT, run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]
MODEL = "openai/gpt-4.1-mini"
FAST = dict(batch_validating_seconds=0.2, batch_median_seconds=1.5, batch_spread=0.0, batch_finalizing_seconds=0.2)


def rows(n: int) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "text": f"row {i}"} for i in range(n)]


def lanes_job(tmp: Path, sim: SimThread, n: int, api: str, *, deadline: str = "60s", models: list[str] | None = None,
              run: dict[str, Any] | None = None) -> Path:
    base = sim.base_url if api == "openai" else sim.base_url.replace("/v1", "/api/v1")
    job = write_job(tmp, input_path=write_jsonl(tmp / "in.jsonl", rows(n)), base_url=base,
                    models=[{"provider": "local", "model": m, "requests_per_minute": 60_000}
                            for m in (models or [MODEL])],
                    run={"lanes": ["batch", "online"], "deadline": deadline, "batch_poll_seconds": 0.25,
                         "batch_expected_seconds": 4, "batch_rows": 400, **(run or {})})
    job.write_text(job.read_text().replace("[providers.local]\n", f'[providers.local]\nbatch_api = "{api}"\n'))
    return job


def results(tmp: Path) -> pd.DataFrame:
    return ds.dataset(tmp / "out" / "results", format="parquet").to_table().to_pandas()


def submitted(sim: SimThread) -> dict[str, int]:
    assert sim.sim.batches is not None
    return dict(sim.sim.batches.counters().submitted)


@pytest.mark.parametrize("api", ["openai", "openrouter"])
def test_a_deadline_job_mixes_lanes_and_answers_every_row_once(tmp_path: Path, sim_factory: Factory,
                                                               api: str) -> None:
    """20,000 rows, a deadline, batches that finish part of their lines before their window and expire the
    rest, and some failed lines: every row once, by the deadline, most by batch at half price."""
    sim = sim_factory(**FAST, batch_window_seconds=1.2, batch_line_failures=0.02, seed=4)
    job = lanes_job(tmp_path, sim, 20_000, api, deadline="90s", run={"batch_rows": 5000})
    started = time.monotonic()
    proc = run_cli("run", str(job), "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 90  # the deadline was kept
    df = results(tmp_path)
    assert len(df) == 20_000 and df["id"].is_unique and (df["status"] == "ok").all()
    by_lane = df["lane"].value_counts().to_dict()
    assert by_lane["batch"] > 10_000 and by_lane.get("online", 0) > 0
    assert (df.loc[df["lane"] == "batch", "batch_id"].notna()).all()
    full_price = (df["billed_prompt_tokens"].sum() * 0.4 + df["billed_completion_tokens"].sum() * 1.6) / 1e6
    assert df["cost_usd"].sum() < 0.8 * full_price  # what all-online would have cost
    assert max(submitted(sim).values()) <= 2  # a line goes to a second batch at most (after it failed or expired)
    lanes = orjson.loads(proc.stdout)["lanes"]  # the summary splits answers and cost by lane, as the rows do
    assert {lane: x["answers"] for lane, x in lanes.items()} == {"batch": by_lane["batch"], "online": by_lane["online"]}
    assert sum(x["cost_usd"] for x in lanes.values()) >= df["cost_usd"].sum() - 1e-9  # + second answers, if any
    assert "by lane     batch: " in run_cli("stats", str(tmp_path / "out")).stdout
    print(f"{api}: rows by lane {by_lane}; cost ${df['cost_usd'].sum():.4f} vs all online ${full_price:.4f}")


@pytest.mark.parametrize("api", ["openai", "openrouter"])
def test_kill_9_after_a_submission_or_while_polling_never_submits_a_line_twice(tmp_path: Path,
                                                                               sim_factory: Factory,
                                                                               api: str) -> None:
    """kill -9 right after a batch is submitted, then at a random moment while polling, then a rerun: the
    rerun reattaches to the batches in flight; no line was submitted twice, every row once."""
    sim = sim_factory(batch_validating_seconds=0.2, batch_median_seconds=4.0, batch_spread=0.0,
                      batch_finalizing_seconds=0.2)
    job = lanes_job(tmp_path, sim, 3000, api, deadline="300s", run={"batch_expected_seconds": 10})
    rng = random.Random(7)
    for when in ("after submit", "polling"):
        proc = subprocess.Popen([sys.executable, "-m", "batch", "run", str(job), "--quiet"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not submitted(sim):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.002)
        if when == "polling":
            time.sleep(rng.uniform(0.5, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    proc = subprocess.run([sys.executable, "-m", "batch", "run", str(job), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    counts = submitted(sim)
    assert max(counts.values()) == 1, "a line was submitted twice"
    df = results(tmp_path)
    assert len(df) == 3000 and df["id"].is_unique and (df["status"] == "ok").all()
    assert sim.counters.requests == 3000 - len(counts)  # online: only rows no batch took
    stats = ds.dataset(tmp_path / "out" / "stats.parquet").to_table().to_pandas()
    assert stats["cost_usd"].sum() == pytest.approx(df["cost_usd"].sum(), rel=1e-6)  # each line billed once


def test_batches_a_provider_no_longer_knows_are_given_up_and_their_rows_sent_again(tmp_path: Path,
                                                                                 sim_factory: Factory) -> None:
    """kill -9 with batches in flight; --fresh then refuses (they may still be billed) and deletes nothing; a
    rerun against a provider that does not know them (another base_url, a restarted server) gives them up
    and answers their rows, once each."""
    slow = sim_factory(batch_validating_seconds=0.2, batch_median_seconds=60.0, batch_spread=0.0)
    job = lanes_job(tmp_path, slow, 1200, "openai", deadline="300s", run={"batch_expected_seconds": 30})
    proc = subprocess.Popen([sys.executable, "-m", "batch", "run", str(job), "--quiet"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while sum(submitted(slow).values()) < 1200:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    time.sleep(0.3)  # the records say "submitted"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    fresh = run_cli("run", str(job), "--fresh", "--quiet")
    assert fresh.returncode == 2 and "may still be answered, and billed" in fresh.stderr, fresh.stderr
    assert "batch status" in fresh.stderr and (tmp_path / "out" / "batches").is_dir()
    other = sim_factory(**FAST)
    job.write_text(job.read_text().replace(slow.base_url, other.base_url))
    proc2 = run_cli("run", str(job), "--quiet", timeout=120)
    assert proc2.returncode == 0, proc2.stderr
    assert "the provider has no batch" in proc2.stderr
    df = results(tmp_path)
    assert len(df) == 1200 and df["id"].is_unique and (df["status"] == "ok").all()


def test_the_embedded_simulators_batches_end_with_its_run(tmp_path: Path) -> None:
    """provider "sim" runs in the batch process: batches it still holds at the end (pulled back for the
    deadline) are given up, so no later run waits for them and --fresh starts over."""
    job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(400)),
                    models=[{"provider": "sim", "model": MODEL, "requests_per_minute": 60_000}],
                    run={"lanes": ["batch", "online"], "deadline": "12s", "online_rows_per_second": 100,
                         "batch_expected_seconds": 1, "batch_poll_seconds": 0.25, "batch_rows": 200},
                    sim={"batch_validating_seconds": 0.2, "batch_median_seconds": 60, "batch_spread": 0.0})
    proc = run_cli("run", str(job), "--quiet")
    assert proc.returncode == 0, proc.stderr
    status = orjson.loads(run_cli("status", str(tmp_path / "out"), "--json").stdout)["batches"]
    assert status and all(b["state"] == "abandoned" for b in status)
    again = run_cli("run", str(job), "--fresh", "--quiet")
    assert again.returncode == 0, again.stderr


def test_the_cost_cap_covers_batches_in_flight(tmp_path: Path, sim_factory: Factory) -> None:
    """max_cost_usd counts a batch's worst case from submission to collection: the batches the cap has room
    for are submitted, the rest go online until the cap; then the run stops spending but still collects the
    batches it paid for, and everything billed stays under the cap."""
    sim = sim_factory(**FAST)
    cap = 0.02  # two batches of 1,000 rows at their worst (~$0.0084 each), then ~200 rows online
    job = lanes_job(tmp_path, sim, 3000, "openai", run={"batch_rows": 1000, "max_cost_usd": cap})
    proc = run_cli("run", str(job), "--quiet")
    assert proc.returncode == 3 and "budget reached" in proc.stderr, proc.stderr
    assert "max_cost_usd has no room for a batch of 1000 rows" in proc.stderr
    df = results(tmp_path)
    assert df["id"].is_unique and (df["lane"] == "batch").sum() == 2000 and (df["lane"] == "online").sum() > 0
    stats = ds.dataset(tmp_path / "out" / "stats.parquet").to_table().to_pandas()
    assert stats["cost_usd"].sum() <= cap


def test_a_batch_that_fails_validation_sends_its_rows_online(tmp_path: Path, sim_factory: Factory) -> None:
    """The provider fails the batch (its enqueued-token limit): the rows go online and nothing is lost."""
    sim = sim_factory(**FAST, batch_enqueued_token_limit=100)
    job = lanes_job(tmp_path, sim, 600, "openai")
    proc = run_cli("run", str(job), "--quiet")
    assert proc.returncode == 0, proc.stderr
    df = results(tmp_path)
    assert len(df) == 600 and df["id"].is_unique and (df["lane"] == "online").all()


def test_a_retired_primary_fails_its_batch_and_its_rows_fall_back_online(tmp_path: Path,
                                                                        sim_factory: Factory) -> None:
    """A batch for a retired model fails validation: its rows go online, where the retired model leaves the
    chain and the next model answers every row."""
    sim = sim_factory(**FAST, retired=("old-model",))
    job = lanes_job(tmp_path, sim, 500, "openrouter", models=["old-model", MODEL])
    proc = run_cli("run", str(job), "--quiet")
    assert proc.returncode == 0, proc.stderr
    df = results(tmp_path)
    assert len(df) == 500 and (df["model"] == MODEL).all() and (df["lane"] == "online").all()


@pytest.mark.parametrize("api", ["openai", "openrouter"])
def test_batches_too_slow_for_the_deadline_are_pulled_back_online(tmp_path: Path, sim_factory: Factory,
                                                                  api: str) -> None:
    """Batches that would finish after the deadline: their rows go online in time (OpenAI's are cancelled;
    OpenRouter's cannot be, so late lines are second answers, counted in stats, never second rows)."""
    sim = sim_factory(batch_validating_seconds=0.2, batch_median_seconds=30.0, batch_spread=0.0,
                      batch_finalizing_seconds=0.2, batch_cancel_seconds=0.5)
    job = lanes_job(tmp_path, sim, 2000, api, deadline="25s",
                    run={"online_rows_per_second": 200, "batch_expected_seconds": 1})
    started = time.monotonic()
    proc = run_cli("run", str(job), "--quiet", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 25
    df = results(tmp_path)
    assert len(df) == 2000 and df["id"].is_unique and (df["status"] == "ok").all()
    assert (df["lane"] == "online").sum() > 0
    if api == "openai":
        assert sim.sim.batches is not None and sim.sim.batches.counters().cancels >= 1


def test_batch_status_shows_the_batches_without_running(tmp_path: Path, sim_factory: Factory) -> None:
    """`batch status OUT` lists the output's batches and their counts from the records; it sends nothing."""
    sim = sim_factory(**FAST)
    job = lanes_job(tmp_path, sim, 900, "openai")
    assert run_cli("run", str(job), "--quiet").returncode == 0
    before = sim.counters.requests
    proc = run_cli("status", str(tmp_path / "out"), "--json")
    assert proc.returncode == 0, proc.stderr
    status = orjson.loads(proc.stdout)
    assert len(status["batches"]) >= 3 and all(b["state"] == "collected" for b in status["batches"])
    assert sum(b["rows"] for b in status["batches"]) >= 900 and sim.counters.requests == before


def test_the_progress_line_counts_rows_the_batch_lane_answered(tmp_path: Path, sim_factory: Factory) -> None:
    """Numbers on screen agree: in a fresh run every finished row is a new row of the dataset, whichever lane
    answered it (the dataset count once stayed at 0 while batches answered thousands of rows)."""
    sim = sim_factory(**{**FAST, "batch_spread": 0.5}, seed=3)  # batches end one by one
    job = lanes_job(tmp_path, sim, 1200, "openai", run={"batch_rows": 200})
    proc = run_cli("run", str(job), env={"BATCH_PROGRESS_SECONDS": "0.2"})
    assert proc.returncode == 0, proc.stderr
    frames = [(int(m[1]), int(m[2])) for m in re.finditer(r"\] (\d+)/1200 rows .*?this run: (\d+) rows", proc.stderr)]
    assert len(frames) >= 3 and any(run for _, run in frames[:-1])
    assert all(dataset == run for dataset, run in frames), frames


def test_the_attempt_log_has_a_row_per_batch_line(tmp_path: Path, sim_factory: Factory) -> None:
    """Batch lines are in the attempt log (lane "batch"), so the report draws both lanes: one row per line
    collected, the answered ones `done`, failed ones `retry`; their cost is the batch lane's in stats."""
    sim = sim_factory(**FAST, batch_line_failures=0.05, seed=5)
    job = lanes_job(tmp_path, sim, 800, "openai")
    assert run_cli("run", str(job), "--quiet").returncode == 0
    attempts = ds.dataset(tmp_path / "out" / "attempts", format="parquet").to_table().to_pandas()
    lines = attempts[attempts["lane"] == "batch"]
    df = results(tmp_path)
    assert (lines["then"] == "done").sum() == (df["lane"] == "batch").sum() > 0
    assert (lines["then"] == "retry").sum() == (lines["outcome"] != "ok").sum() > 0
    assert len(lines) == sum(submitted(sim).values())  # every line submitted was collected once
    stats = pd.read_parquet(tmp_path / "out" / "stats.parquet")
    assert lines["cost_usd"].sum() == pytest.approx(stats.loc[stats["model"].str.endswith("@batch"), "cost_usd"].sum())
    assert lines["latency_ms"].isna().all()
