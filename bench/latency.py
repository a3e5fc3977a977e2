"""Latency hiding: simulator latency 500 ms, concurrency 512. Ideal = concurrency / latency.

    .venv/bin/python bench/latency.py [--rows 30720]

Reads the simulator's admission times: steady state (after the first 2 s,
before the last second), from the first request to the last answer, and
from launch to the end (start-up and the input scan included).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import sim_process, sim_stats, write_job, write_parquet

import batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=30720)
    ap.add_argument("--concurrency", type=int, default=512)
    ap.add_argument("--latency-ms", type=float, default=500)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="batch-lat-"))
    try:
        data = write_parquet(tmp / "in.parquet", args.rows)
        with sim_process("--latency-ms", str(args.latency_ms), "--record-times") as url:
            job = batch.load_job(write_job(tmp / "job.toml", data, url, args.concurrency))
            t0 = time.perf_counter()
            summary = batch.run(job, quiet=True)
            wall = time.perf_counter() - t0
            adm = sim_stats(url)["admissions"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert summary.rows_ok == args.rows
    ideal = args.concurrency / (args.latency_ms / 1000)
    sending = adm[-1][0] - adm[0][0] + args.latency_ms / 1000  # first request in to last answer out
    overall = args.rows / sending
    t0, t1 = adm[0][0] + 2.0, adm[-1][0] - 1.0  # steady state: skip slow start and the last second
    steady = sum(1 for t, _ in adm if t0 <= t < t1) / (t1 - t0)
    print(f"rows={args.rows} concurrency={args.concurrency} latency={args.latency_ms:g} ms")
    print(f"{'ideal rows/s':28} {ideal:9.0f}")
    print(f"{'achieved rows/s (steady)':28} {steady:9.0f}  {100 * steady / ideal:5.1f}% of ideal")
    print(f"{'achieved rows/s (sending)':28} {overall:9.0f}  {100 * overall / ideal:5.1f}% of ideal "
          f"(includes the slow start: the first request goes alone)")
    print(f"{'achieved rows/s (wall)':28} {args.rows / wall:9.0f}  {100 * args.rows / wall / ideal:5.1f}% "
          f"of ideal (includes start-up and the input scan)")


if __name__ == "__main__":
    main()
