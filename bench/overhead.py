"""Overhead: the full pipeline against a bare aiohttp loop, same simulator, same run.

    .venv/bin/python bench/overhead.py [--rows 50000] [--concurrency 64] [--rounds 3]

Starts `batch sim` (zero latency) in its own process. Then, in turn and in
separate processes (so each pays its own start-up, as a user would):
1. bare: asyncio + aiohttp, one pre-encoded body per row, orjson-parse each reply;
2. batch: `batch run` on a generated Parquet input: scan, read, build, send,
   parse, write Parquet parts, stats, manifest.
Prints rows/s and CPU seconds per 1,000 rows (user + system of the process and
its threads) for each, best of --rounds, and their ratio.

With --cache, three more runs per round measure the response cache: a cold
cache (every row a miss: looked up, sent, stored), a warm cache (every row a
hit: nothing sent) and replay; then lookups per second on the cache file
itself (hits and misses, in-process).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import PYTHON, ROOT, sim_process, write_job, write_parquet

BARE = r"""
import asyncio, sys, aiohttp, orjson
url, n, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
texts = [f"Label the sentiment of review {i} (positive/negative/neutral): it was fine" for i in range(n)]

async def main():
    bodies = (orjson.dumps({"model": "openai/gpt-4.1-mini", "messages": [{"role": "user", "content": t}],
                            "temperature": 0, "max_tokens": 5}) for t in texts)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker():
            for body in bodies:
                async with s.post(url + "/chat/completions", data=body, headers=headers) as r:
                    orjson.loads(await r.read())["choices"][0]["message"]["content"]
        await asyncio.gather(*(worker() for _ in range(concurrency)))

asyncio.run(main())
"""


def child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flush-rows", type=int, default=1000)
    ap.add_argument("--cache", action="store_true", help="also measure the response cache")
    ap.add_argument("--attempt-log", action="store_true", help="also run with [output] attempt_log = false")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    results: dict[str, list[tuple[float, float]]] = {"bare aiohttp loop": [], "batch run (full pipeline)": []}
    cache_file = tmp / "cache.sqlite3"
    lookups: tuple[float, float] | None = None
    try:
        data = write_parquet(tmp / "in.parquet", args.rows)
        with sim_process() as url:
            job = write_job(tmp / "job.toml", data, url, args.concurrency)
            text = job.read_text().replace("[output]\n", f"[output]\nflush_rows = {args.flush_rows}\n")
            job.write_text(text + f'cache_path = "{cache_file}"\n')
            run = [PYTHON, "-m", "batch", "run", str(job), "--quiet", "--fresh"]
            no_log = tmp / "job-no-attempt-log.toml"
            no_log.write_text(job.read_text().replace("[output]\n", "[output]\nattempt_log = false\n"))
            for _ in range(args.rounds):
                results["bare aiohttp loop"].append(
                    child([PYTHON, "-c", BARE, url, str(args.rows), str(args.concurrency)]))
                results["batch run (full pipeline)"].append(child(run))
                if args.attempt_log:
                    results.setdefault("batch run, attempt log off", []).append(
                        child([PYTHON, "-m", "batch", "run", str(no_log), "--quiet", "--fresh"]))
                if args.cache:
                    for suffix in ("", "-wal", "-shm"):
                        Path(f"{cache_file}{suffix}").unlink(missing_ok=True)
                    results.setdefault("cache read-write, all miss", []).append(child(run + ["--cache", "read-write"]))
                    results.setdefault("cache read-write, all hit", []).append(child(run + ["--cache", "read-write"]))
                    results.setdefault("cache replay, all hit", []).append(child(run + ["--cache", "replay"]))
            if args.cache:
                lookups = lookup_rate(cache_file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"rows={args.rows} concurrency={args.concurrency} flush_rows={args.flush_rows} "
          f"rounds={args.rounds} (best round; each in its own process, start-up included)")
    print(f"{'':28} {'rows/s':>9} {'CPU s/1k rows':>14}")
    best = {}
    for name, runs in results.items():
        wall = min(w for w, _ in runs)
        cpu_s = min(c for _, c in runs)
        best[name] = (args.rows / wall, cpu_s / args.rows * 1000)
        print(f"{name:28} {best[name][0]:9.0f} {best[name][1]:14.3f}")
    b, p = best["bare aiohttp loop"], best["batch run (full pipeline)"]
    print(f"{'ratio batch/bare':28} {p[0] / b[0]:9.2f} {p[1] / b[1]:14.2f}")
    if lookups is not None:
        print(f"cache lookups/s on the {args.rows}-entry file (one connection, in-process): "
              f"{lookups[0]:,.0f} hits, {lookups[1]:,.0f} misses")


def lookup_rate(path: Path, n: int = 50_000) -> tuple[float, float]:
    """ResponseCache.get per second for stored keys and for absent ones."""
    import sqlite3

    from batch.cache import ResponseCache

    keys = [k for (k,) in sqlite3.connect(path).execute("SELECT key FROM responses")]
    random.shuffle(keys)
    cache = ResponseCache(path, "replay")
    rates = []
    for sample in ((keys * (n // len(keys) + 1))[:n], [os.urandom(20) for _ in range(n)]):
        t0 = time.perf_counter()
        for k in sample:
            cache.get(k)
        rates.append(n / (time.perf_counter() - t0))
    cache.close()
    return rates[0], rates[1]


if __name__ == "__main__":
    main()
