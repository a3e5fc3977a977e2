"""Rate-limit benchmark: does batch run *at* the provider's limit, not into it, when the provider enforces its
per-minute limit over shorter windows too (OpenAI: "60,000 requests per minute may be enforced as 1,000 per
second")?

    .venv/bin/python bench/ratelimit.py                       # every scenario, ~2.5 minutes each
    .venv/bin/python bench/ratelimit.py --only rpm-1x --minutes 1
    .venv/bin/python bench/ratelimit.py --client-root /path/to/older/checkout   # the same, older client

Each scenario starts `batch sim` (this checkout's) in its own process with a per-minute limit that it also
enforces per second (`--limit-windows 1`), runs a job against it for about --minutes, and reads the
simulator's own counters (GET /_sim/stats): the rate it admitted after the first 10 s, the most it admitted
in any 60 s and any 1 s window, and how many requests it refused with 429. `--client-root` runs
`batch run` from another checkout (e.g. an older commit) against the same simulator, for a before/after.
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
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Scenario:
    name: str
    budget: str  # "requests" | "tokens"
    limit: int  # per minute, the provider's
    job_factor: float  # the job's limit, as a multiple of the provider's
    style: str = "openai"


SCENARIOS = [
    Scenario("rpm-1x", "requests", 1200, 1.0),
    Scenario("rpm-2x", "requests", 1200, 2.0),
    Scenario("rpm-2x-bare", "requests", 1200, 2.0, "bare"),
    # 500 rpm counted per second admits 8 a second (480 a minute): the stated limit is more than the provider holds
    Scenario("rpm500-1x", "requests", 500, 1.0),
    Scenario("rpm500-1.2x", "requests", 500, 1.2),
    Scenario("tpm-1x", "tokens", 60_000, 1.0),
    Scenario("tpm-2x", "tokens", 60_000, 2.0),
    Scenario("tpm-2x-bare", "tokens", 60_000, 2.0, "bare"),
]


def write_inputs(tmp: Path, sc: Scenario, minutes: float, url: str) -> Path:
    rng = random.Random(1)
    words = "the quick brown fox jumps over a lazy dog while reviewers write long notes about products".split()
    per_minute = sc.limit if sc.budget == "requests" else sc.limit // 120  # varied prompts: ~120 tokens each
    with open(tmp / "in.jsonl", "w") as f:
        for i in range(int(per_minute * minutes) + 10):
            length = rng.randint(10, 300) if sc.budget == "tokens" else 12
            f.write(json.dumps({"id": f"r{i}", "text": f"{i} " + " ".join(rng.choice(words) for _ in range(length))})
                    + "\n")
    key = "requests_per_minute" if sc.budget == "requests" else "tokens_per_minute"
    job = tmp / "job.toml"
    job.write_text(f"""
[input]
path = "in.jsonl"
id_column = "id"
template = "{{text}}"
[output]
path = "out"
[request]
max_tokens = 20
[[models]]
provider = "local"
model = "openai/gpt-4.1-mini"
{key} = {int(sc.limit * sc.job_factor)}
[providers.local]
base_url = "{url}"
[run]
concurrency = 64
""")
    return job


def measure(sc: Scenario, minutes: float, client_root: Path) -> dict[str, object]:
    port = free_port()
    flag = "--requests-per-minute" if sc.budget == "requests" else "--tokens-per-minute"
    sim = subprocess.Popen([sys.executable, "-m", "batch", "sim", "--port", str(port), "--latency-ms", "50",
                            "--rate-limit-style", sc.style, flag, str(sc.limit), "--limit-windows", "1",
                            "--record-times"], stdout=subprocess.PIPE, cwd=ROOT)
    assert sim.stdout is not None
    sim.stdout.readline()
    tmp = Path(tempfile.mkdtemp(prefix="batch-rl-"))
    try:
        job = write_inputs(tmp, sc, minutes, f"http://127.0.0.1:{port}/v1")
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "batch", "run", str(job), "--quiet"], cwd=client_root,
                              capture_output=True, text=True, timeout=minutes * 60 * 4 + 120)
        wall = time.monotonic() - t0
        stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/stats").read())
    finally:
        sim.terminate()
        sim.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return summarize(sc, stats, proc.returncode, wall)


def summarize(sc: Scenario, stats: dict[str, object], code: int, wall: float) -> dict[str, object]:
    admissions: list[list[float]] = stats["admissions"]  # type: ignore[assignment]
    refusals: list[float] = stats["refusals"]  # type: ignore[assignment]
    t_first, t_last = admissions[0][0], admissions[-1][0]
    steady = [a for a in admissions if a[0] >= t_first + 10]  # after the first 10 s: the rate it settles at
    span = max(t_last - (t_first + 10), 1e-9)
    amount = len(steady) if sc.budget == "requests" else sum(a[1] for a in steady)
    peaks = stats["peaks"][sc.budget]  # type: ignore[index]
    requests = int(stats["requests"])  # type: ignore[arg-type]
    return {
        "scenario": sc.name, "style": sc.style, "exit": code, "wall_s": round(wall),
        "limit_per_min": sc.limit, "job_limit": int(sc.limit * sc.job_factor),
        "achieved_%": round(100 * amount * 60 / span / sc.limit, 1),
        "429_%": round(100 * len(refusals) / max(1, requests), 2),
        "peak_60s_%": round(100 * peaks["60"] / sc.limit, 1),
        "peak_1s_%": round(100 * peaks["1"] / (sc.limit / 60), 1),
        "requests": requests,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=2.5)
    ap.add_argument("--only", action="append")
    ap.add_argument("--client-root", type=Path, default=ROOT, help="run `batch run` from this checkout")
    args = ap.parse_args()
    rows = []
    for sc in SCENARIOS:
        if args.only and sc.name not in args.only:
            continue
        rows.append(measure(sc, args.minutes, args.client_root.resolve()))
        print(json.dumps(rows[-1]), flush=True)
    cols = list(rows[0])
    print(f"\nclient: {args.client_root}; the simulator enforces each limit per minute and per second")
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
