"""Rate-limit benchmark: does batch run *at* the provider's limit, not into it?

    .venv/bin/python bench/ratelimit.py            # all scenarios, about 15 minutes
    .venv/bin/python bench/ratelimit.py --only rpm-exact --minutes 1

Each scenario starts `batch sim` with a sliding 60-second limit in its own
process, runs a job against it for about --minutes, and reads the simulator's
own counters (GET /_sim/stats): the rate it admitted, the most requests it
*received* in any 60 s window (admitted or refused: what batch offered), and
how many 429s it had to send.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Scenario:
    name: str
    sim_rpm: int | None
    sim_tpm: int | None
    job_rpm: int | None
    job_tpm: int | None
    style: str = "openai"
    varied: bool = False  # prompts of varied length


SCENARIOS = [
    Scenario("rpm-exact", 1200, None, 1200, None),
    Scenario("rpm-2x-openai", 1200, None, 2400, None, "openai"),
    Scenario("rpm-2x-openrouter", 1200, None, 2400, None, "openrouter"),
    Scenario("rpm-2x-bare", 1200, None, 2400, None, "bare"),
    Scenario("tpm-exact", None, 60000, None, 60000, "openai", varied=True),
    Scenario("tpm-2x-bare", None, 60000, None, 120000, "bare", varied=True),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_inputs(tmp: Path, sc: Scenario, minutes: float) -> Path:
    rng = random.Random(1)
    words = "the quick brown fox jumps over a lazy dog while reviewers write long notes about products".split()
    per_minute = sc.sim_rpm or (sc.sim_tpm or 60000) // 260  # varied prompts average ~260 tokens
    n = int(per_minute * minutes * 1.0) + 10
    with open(tmp / "in.jsonl", "w") as f:
        for i in range(n):
            length = rng.randint(10, 400) if sc.varied else 12
            text = " ".join(rng.choice(words) for _ in range(length))
            f.write(json.dumps({"id": f"r{i}", "text": f"{i} {text}"}) + "\n")
    limits = ""
    if sc.job_rpm:
        limits += f"requests_per_minute = {sc.job_rpm}\n"
    if sc.job_tpm:
        limits += f"tokens_per_minute = {sc.job_tpm}\n"
    job = tmp / "job.toml"
    job.write_text(f"""
[input]
path = "in.jsonl"
id_column = "id"
template = "{{text}}"
[output]
path = "out"
[request]
max_tokens = 50
[[models]]
provider = "local"
model = "openai/gpt-4.1-mini"
{limits}
[providers.local]
base_url = "URL"
[run]
concurrency = 32
""")
    return job


def run(sc: Scenario, minutes: float) -> dict[str, object]:
    port = free_port()
    cmd = [sys.executable, "-m", "batch", "sim", "--port", str(port), "--latency-ms", "50",
           "--rate-limit-style", sc.style, "--record-times"]
    if sc.sim_rpm:
        cmd += ["--requests-per-minute", str(sc.sim_rpm)]
    if sc.sim_tpm:
        cmd += ["--tokens-per-minute", str(sc.sim_tpm)]
    sim = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT)
    assert sim.stdout is not None
    sim.stdout.readline()
    tmp = Path(tempfile.mkdtemp(prefix="batch-rl-"))
    try:
        job = write_inputs(tmp, sc, minutes)
        job.write_text(job.read_text().replace("URL", f"http://127.0.0.1:{port}/v1"))
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "batch", "run", str(job), "--quiet"], cwd=ROOT,
                              capture_output=True, text=True, timeout=minutes * 60 * 3 + 120)
        wall = time.monotonic() - t0
        stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/stats").read())
    finally:
        sim.terminate()
        sim.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    adm = stats["admissions"]
    t_first, t_last = adm[0][0], adm[-1][0]
    span = max(t_last - t_first, 1e-9)
    late = [a for a in adm if a[0] >= t_first + 60]
    late_span = max(t_last - (t_first + 60), 1e-9)
    unit = 1 if sc.sim_rpm else None
    def rate(items: list[list[float]], seconds: float) -> float:
        total = len(items) if unit else sum(a[1] for a in items)
        return total * 60 / seconds
    limit = sc.sim_rpm or sc.sim_tpm
    assert limit is not None
    peak = stats["peaks"]["requests" if sc.sim_rpm else "tokens"]["60"]
    return {
        "scenario": sc.name, "exit": proc.returncode, "wall_s": round(wall),
        "limit": limit, "job_limit": sc.job_rpm or sc.job_tpm,
        "achieved_%": round(100 * rate(adm, span) / limit, 1),
        "after_1min_%": round(100 * rate(late, late_span) / limit, 1) if late else None,
        "peak_window": peak, "peak_offered_req": stats["peaks"]["offered"]["60"],
        "429_%": round(100 * stats["rate_limited"] / max(1, stats["requests"]), 2),
        "429_after_1min_%": round(100 * sum(1 for t in stats["refusals"] if t >= t_first + 60)
                                  / max(1, sum(1 for a in adm if a[0] >= t_first + 60)
                                        + sum(1 for t in stats["refusals"] if t >= t_first + 60)), 2),
        "429_after_2min_%": round(100 * sum(1 for t in stats["refusals"] if t >= t_first + 120)
                                  / max(1, sum(1 for a in adm if a[0] >= t_first + 120)
                                        + sum(1 for t in stats["refusals"] if t >= t_first + 120)), 2),
        "requests": stats["requests"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=2.2)
    ap.add_argument("--only", action="append")
    args = ap.parse_args()
    rows = []
    for sc in SCENARIOS:
        if args.only and sc.name not in args.only:
            continue
        rows.append(run(sc, args.minutes))
        print(json.dumps(rows[-1]), flush=True)
    cols = list(rows[0])
    print()
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
