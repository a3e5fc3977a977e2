"""Scattered 429s: a few refusals that say nothing about the job's own rate must not collapse the run.

    .venv/bin/python bench/scattered429.py [--rows 1500] [--rounds 3] [--client-root CHECKOUT]

OpenRouter passes on 429s from busy upstream providers: Retry-After 1, no rate-limit headers, no
configured limit. The same job (1,500 rows, the demo's 40 +/- 20 ms latency, concurrency 32) runs with
0%, 1%, 3% and 10% of attempts answered such a 429, in separate processes; the table shows the wall time
of each (best of --rounds) and its ratio to the run without 429s. `--client-root` runs `batch run` from
another checkout against the same simulator, for a before/after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import free_port

ROOT = Path(__file__).resolve().parent.parent
SHARES = (0.0, 0.01, 0.03, 0.10)


def job_file(tmp: Path, url: str, rows: int) -> Path:
    with open(tmp / "in.jsonl", "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i}", "text": f"review {i}: it was fine"}) + "\n")
    job = tmp / "job.toml"
    job.write_text(f"""
[input]
path = "in.jsonl"
id_column = "id"
template = "Label (positive/negative/neutral): {{text}}"
[output]
path = "out"
[request]
temperature = 0
max_tokens = 5
[[models]]
provider = "local"
model = "openai/gpt-4.1-mini"
[providers.local]
base_url = "{url}"
[run]
concurrency = 32
""")
    return job


def one(share: float, rows: int, client_root: Path) -> float:
    port = free_port()
    fault = ["--fault", f"429={share}"] if share else []
    sim = subprocess.Popen([sys.executable, "-m", "batch", "sim", "--port", str(port), "--latency-ms", "40",
                            "--latency-jitter-ms", "20", "--retry-after-seconds", "1", "--rate-limit-style", "bare",
                            *fault], stdout=subprocess.PIPE, cwd=ROOT)
    assert sim.stdout is not None
    sim.stdout.readline()
    tmp = Path(tempfile.mkdtemp(prefix="batch-429-"))
    try:
        job = job_file(tmp, f"http://127.0.0.1:{port}/v1", rows)
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "batch", "run", str(job), "--quiet"], cwd=client_root,
                              capture_output=True, text=True, timeout=600)
        wall = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        sim.terminate()
        sim.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--client-root", type=Path, default=ROOT)
    args = ap.parse_args()
    best = {share: min(one(share, args.rows, args.client_root.resolve()) for _ in range(args.rounds))
            for share in SHARES}
    print(f"client: {args.client_root}; {args.rows} rows, best of {args.rounds}")
    print("429 share | wall s | vs no 429s")
    print("--- | --- | ---")
    for share, wall in best.items():
        print(f"{share:.0%} | {wall:.1f} | {wall / best[0.0]:.2f}x")


if __name__ == "__main__":
    main()
