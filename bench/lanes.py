"""Lanes benchmark: what a deadline buys. A 20,000-row job with lanes = ["batch", "online"] against the
simulator's Batch API, for deadlines of 10 minutes, 1 hour and 8 hours of *simulated* time: rows by lane,
cost against what the same rows cost all online, wall time, and whether the deadline was kept.

    .venv/bin/python bench/lanes.py                          # three deadlines x three seeds, OpenAI (~25 min)
    .venv/bin/python bench/lanes.py --api openrouter --deadline 1h
    .venv/bin/python bench/lanes.py --scale 60 --online-rpm 1000

The simulator's clock is scaled: every duration (batch turnaround, completion window, poll interval, request
latency, the deadline) is divided by the scale and every rate multiplied by it, so 8 simulated hours take
8 h / scale of wall time (SCALES: x5 for 10 minutes, x20 for 1 hour, x240 for 8 hours; --scale sets one for all).
At x240 the online lane's limit is more than this machine sends; after 8 hours it only answers the lines that
failed, so only that tail's wall time is stretched. Batches take the simulator's default turnaround (log-normal, median 7 minutes, 90%
within an hour: OpenRouter's published figures, WIRE-BATCH.md; a few take many hours, so each seed draws
other turnarounds) and 1% of their lines fail. The online lane is
held to --online-rpm by the simulator (per minute and per second), and the job's limit says the same.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds
from common import PYTHON, ROOT, sim_process

PRICE_IN, PRICE_OUT = 0.40, 1.60  # openai/gpt-4.1-mini, $ per million tokens: the all-online price
DEADLINES = {"10m": 600.0, "1h": 3600.0, "8h": 28_800.0}
# simulated seconds per wall second, per deadline: each run takes 2-3 minutes, and the online lane at its limit
# stays under ~1,000 requests per wall second, about what one core of this client and one of the simulator do
SCALES = {"10m": 5.0, "1h": 20.0, "8h": 240.0}
SIM_SECONDS = {"validating": 2.0, "median": 420.0, "finalizing": 2.0, "window": 86_400.0, "cancel": 60.0}


def write_job(tmp: Path, url: str, rows: int, api: str, deadline_s: float, scale: float, online_rpm: int) -> Path:
    rng = random.Random(7)
    words = "label this short product review as positive negative or neutral please".split()
    with open(tmp / "in.jsonl", "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i}", "text": " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))})
                    + "\n")
    base = url if api == "openai" else url.replace("/v1", "/api/v1")
    job = tmp / "job.toml"
    job.write_text(f"""
[input]
path = "in.jsonl"
template = "{{text}}"
[output]
path = "out"
[request]
max_tokens = 16
[[models]]
provider = "local"
model = "openai/gpt-4.1-mini"
requests_per_minute = {int(online_rpm * scale)}
[providers.local]
base_url = "{base}"
batch_api = "{api}"
[run]
concurrency = 128
lanes = ["batch", "online"]
deadline = "{deadline_s / scale:.3f}s"
batch_expected_seconds = {3600 / scale:.3f}
batch_poll_seconds = {max(0.2, 30 / scale):.3f}
batch_rows = 5000
""")
    return job


def measure(api: str, name: str, rows: int, scale: float, online_rpm: int, failures: float,
            seed: int) -> dict[str, object]:
    deadline = DEADLINES[name]
    sim_args = ["--latency-ms", f"{1000 / scale:.2f}", "--requests-per-minute", str(int(online_rpm * scale)),
                "--limit-window", "1", "--batch-line-failures", str(failures), "--seed", str(seed),
                *(x for k, v in SIM_SECONDS.items() for x in (f"--batch-{k}-seconds", f"{v / scale:.4f}"))]
    tmp = Path(tempfile.mkdtemp(prefix="batch-lanes-"))
    try:
        with sim_process(*sim_args) as url:
            job = write_job(tmp, url, rows, api, deadline, scale, online_rpm)
            t0 = time.monotonic()
            proc = subprocess.run([PYTHON, "-m", "batch", "run", str(job), "--json"], cwd=ROOT, capture_output=True,
                                  text=True, timeout=deadline / scale * 3 + 300)
            wall = (time.monotonic() - t0) * scale
        if proc.returncode != 0:
            sys.exit(f"{api} {name}: batch run exited {proc.returncode}\n{proc.stderr[-2000:]}")
        if "--verbose" in sys.argv:
            print(proc.stderr[-4000:], file=sys.stderr)
        summary = json.loads(proc.stdout)
        table = ds.dataset(tmp / "out" / "results", format="parquet").to_table(
            columns=["id", "lane", "billed_prompt_tokens", "billed_completion_tokens"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lanes = table["lane"].to_pylist()
    all_online = (sum(table["billed_prompt_tokens"].to_pylist()) * PRICE_IN
                  + sum(table["billed_completion_tokens"].to_pylist()) * PRICE_OUT) / 1e6
    run_wall = float(summary["this_run"]["wall_seconds"]) * scale
    cost = float(summary["this_run"]["cost_usd"])  # every billed reply: answers, second answers, repairs
    return {
        "api": api, "deadline": name, "seed": seed, "rows": table.num_rows, "unique": len(set(table["id"].to_pylist())),
        "batch_rows": lanes.count("batch"), "online_rows": lanes.count("online"),
        "second_answers": sum(x["second_answers"] for x in summary["lanes"].values()),
        "cost_usd": round(cost, 4), "all_online_usd": round(all_online, 4),
        "saved_%": round(100 * (1 - cost / all_online), 1) if all_online else 0.0,
        # the deadline counts from the run's start (the summary's clock); the process also starts up and exits
        "run_sim_min": round(run_wall / 60, 2), "process_sim_min": round(wall / 60, 2), "kept": run_wall <= deadline,
        "all_online_min": round(rows / online_rpm, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--api", choices=["openai", "openrouter"], action="append")
    ap.add_argument("--deadline", choices=list(DEADLINES), action="append")
    ap.add_argument("--scale", type=float, help="simulated seconds per wall-clock second (default: SCALES)")
    ap.add_argument("--online-rpm", type=int, default=3000, help="the online lane's limit, per simulated minute")
    ap.add_argument("--line-failures", type=float, default=0.01)
    ap.add_argument("--seeds", default="1,2,3", help="simulator seeds: each draws other batch turnarounds")
    ap.add_argument("--verbose", action="store_true", help="print the end of each run's log (its lane messages)")
    args = ap.parse_args()
    results = []
    for api in args.api or ["openai"]:
        for name in args.deadline or list(DEADLINES):
            scale = args.scale or SCALES[name]
            for seed in (int(x) for x in args.seeds.split(",")):
                results.append({**measure(api, name, args.rows, scale, args.online_rpm, args.line_failures, seed),
                                "scale": scale})
                print(json.dumps(results[-1]), flush=True)
    cols = list(results[0])
    print(f"\n{args.rows} rows, online limit {args.online_rpm} rpm (simulated), {args.line_failures:.0%} of batch "
          "lines fail; times in simulated minutes")
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in results:
        print(" | ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
