"""The Ray engine: throughput with 1, 2 and 4 workers next to a local run, Ray's start-up cost, and one
global limit on 4 workers (issue 18). Prints figures; asserts nothing.

    .venv/bin/python bench/ray_scale.py scale --rows 5000      # zero-latency simulator, ~2 min
    .venv/bin/python bench/ray_scale.py startup                # ray.init/shutdown, and a 10-row run end to end
    .venv/bin/python bench/ray_scale.py limit --rows 20000     # 4 workers at 1,200 rpm: ~17 min

``scale`` starts one local Ray cluster in this process (as a notebook would) and runs the same job
locally and on Ray against `batch sim` (its own process, zero latency); the Ray runs' wall time
therefore leaves out cluster start-up, which ``startup`` measures. ``limit`` runs `batch run --ray` with
4 workers against a simulator limited to 1,200 requests per minute, enforced per second too, and reads the
simulator's admissions: the most in any 60 s window, 429s, and the achieved rate as a share of the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PYTHON, ROOT, sim_process, sim_stats, write_job, write_parquet

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
CPUS = max(4, 2 * (os.cpu_count() or 1))


def scale(rows: int, workers: list[int], concurrency: int) -> None:
    import ray

    import batch

    with tempfile.TemporaryDirectory() as tmp, sim_process() as url:
        data = write_parquet(Path(tmp) / "in.parquet", rows)
        started = time.monotonic()
        ray.init(num_cpus=CPUS, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
        print(f"ray.init (in process, {CPUS} logical CPUs): {time.monotonic() - started:.1f} s")
        print(f"{'engine':10} {'workers':>7} {'rows':>7} {'wall s':>7} {'rows/s':>8}")
        for engine, n in [("local", 0), *(("ray", w) for w in workers)]:
            job = batch.load_job(write_job(Path(tmp) / f"{engine}{n}.toml", data, url, concurrency))
            started = time.monotonic()
            summary = batch.run(job, quiet=True, fresh=True, engine=engine, ray_workers=n or None)
            wall = time.monotonic() - started
            assert summary.rows_this_run == rows, summary.stop_reason
            print(f"{engine:10} {n or '-':>7} {rows:>7} {wall:7.1f} {rows / wall:8.0f}", flush=True)
        ray.shutdown()


def startup() -> None:
    code = ("import os, time; os.environ['RAY_USAGE_STATS_ENABLED'] = '0'; t = time.monotonic(); import ray, "
            "ray.data; i = time.monotonic(); ray.init(num_cpus=%d, include_dashboard=False, "
            "_node_ip_address='127.0.0.1', logging_level='ERROR'); s = time.monotonic(); ray.shutdown(); "
            "print(i - t, s - i, time.monotonic() - s)" % CPUS)
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    print(f"import ray, ray.data: {float(out[0]):.1f} s; ray.init (local cluster): {float(out[1]):.1f} s; "
          f"ray.shutdown: {float(out[2]):.1f} s")
    with tempfile.TemporaryDirectory() as tmp, sim_process() as url:
        data = write_parquet(Path(tmp) / "in.parquet", 10)
        job = write_job(Path(tmp) / "job.toml", data, url, 8)
        for args in ([], ["--ray"]):
            started = time.monotonic()
            subprocess.run([PYTHON, "-m", "batch", "run", str(job), "--quiet", "--fresh", *args], check=True,
                           capture_output=True, cwd=ROOT)
            print(f"batch run {' '.join(args) or '(local)':8} 10 rows, end to end: {time.monotonic() - started:.1f} s")


def limit(rows: int, rpm: int, workers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, sim_process("--requests-per-minute", str(rpm), "--limit-window", "1",
                                                            "--record-times") as url:
        data = write_parquet(Path(tmp) / "in.parquet", rows)
        job = write_job(Path(tmp) / "job.toml", data, url, 64)
        text = job.read_text().replace('model = "openai/gpt-4.1-mini"\n',
                                       f'model = "openai/gpt-4.1-mini"\nrequests_per_minute = {rpm}\n')
        job.write_text(text)
        started = time.monotonic()
        done = subprocess.run([PYTHON, "-m", "batch", "run", str(job), "--quiet", "--json", "--ray",
                               "--ray-workers", str(workers)], capture_output=True, text=True, cwd=ROOT)
        wall = time.monotonic() - started
        summary = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
        stats = sim_stats(url)
    times = sorted(t for t, _ in stats["admissions"])
    max60 = max_window(times, 60.0)
    max1 = max_window(times, 1.0)
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    rate = (len(times) - 1) / span * 60 if span else 0.0
    refused = stats["rate_limited"]
    print(f"{rows} rows, {workers} workers, limit {rpm} rpm (enforced per second too): exit {done.returncode}, "
          f"wall {wall:.0f} s")
    print(f"  admitted {len(times)}; max in any 60 s: {max60} ({max60 / rpm:.1%} of the limit); max in any 1 s: "
          f"{max1} (limit {rpm / 60:g})")
    print(f"  mean rate first to last admission: {rate:.0f} rpm ({rate / rpm:.1%} of the limit); 429s: {refused} "
          f"({refused / max(1, stats['requests']):.2%} of {stats['requests']} requests)")
    if summary:
        print(f"  summary: {summary['ok']} ok, {summary['error']} error, {summary['dataset']['rows_left']} left, "
              f"{summary['requests']} requests")
    else:
        print(done.stderr[-2000:], file=sys.stderr)


def max_window(times: list[float], seconds: float) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - seconds:
            start += 1
        best = max(best, end - start + 1)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("scale", "startup", "limit"))
    p.add_argument("--rows", type=int)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rpm", type=int, default=1200)
    args = p.parse_args()
    if args.what == "scale":
        scale(args.rows or 5000, args.workers, args.concurrency)
    elif args.what == "startup":
        startup()
    else:
        limit(args.rows or 20_000, args.rpm, max(args.workers))


if __name__ == "__main__":
    main()
