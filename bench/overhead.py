"""Overhead benchmark: the full pipeline against a bare aiohttp loop, same simulator, same run.

    .venv/bin/python bench/overhead.py [--rows 20000] [--concurrency 64]

Starts `batch sim` (zero latency) in a separate process, then in turn:
1. bare: asyncio + aiohttp, pre-encoded bodies, parse each reply with orjson;
2. batch: `batch run` on a generated Parquet input (read, build, send, parse,
   write Parquet, stats), in-process via the Python API.
Prints rows/s and CPU seconds per 1,000 rows of *this* process for each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import batch  # noqa: E402


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def texts(n: int) -> list[str]:
    return [f"Label the sentiment of review {i} (positive/negative/neutral): it was fine" for i in range(n)]


async def bare(url: str, n: int, concurrency: int) -> None:
    bodies = [orjson.dumps({"model": "openai/gpt-3.5-turbo", "messages": [{"role": "user", "content": t}],
                            "temperature": 0, "max_tokens": 5}) for t in texts(n)]
    it = iter(bodies)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker() -> None:
            for body in it:
                async with s.post(url + "/chat/completions", data=body, headers=headers) as r:
                    data = orjson.loads(await r.read())
                    data["choices"][0]["message"]["content"]
        await asyncio.gather(*(worker() for _ in range(concurrency)))


def write_job(tmp: Path, url: str, n: int, concurrency: int) -> Path:
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "text": texts(n)}), tmp / "in.parquet")
    job = tmp / "job.toml"
    job.write_text(f"""
[input]
path = "in.parquet"
id_column = "id"
template = "{{text}}"
[output]
path = "out"
[request]
temperature = 0
max_tokens = 5
[[models]]
provider = "local"
model = "openai/gpt-3.5-turbo"
[providers.local]
base_url = "{url}"
[run]
concurrency = {concurrency}
""")
    return job


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "batch", "sim", "--port", str(port)], stdout=subprocess.PIPE)
    assert sim.stdout is not None
    sim.stdout.readline()  # "listening on ..."
    url = f"http://127.0.0.1:{port}/v1"
    tmp = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    results: dict[str, list[tuple[float, float]]] = {"bare aiohttp loop": [], "batch run (full pipeline)": []}
    try:
        job_path = write_job(tmp, url, args.rows, args.concurrency)
        for _ in range(args.rounds):
            c0, t0 = cpu(), time.perf_counter()
            asyncio.run(bare(url, args.rows, args.concurrency))
            results["bare aiohttp loop"].append((time.perf_counter() - t0, cpu() - c0))
            shutil.rmtree(tmp / "out", ignore_errors=True)
            job = batch.load_job(job_path)
            c0, t0 = cpu(), time.perf_counter()
            summary = batch.run(job, quiet=True)
            results["batch run (full pipeline)"].append((time.perf_counter() - t0, cpu() - c0))
            assert summary.rows_ok == args.rows, summary
    finally:
        sim.terminate()
        sim.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"rows={args.rows} concurrency={args.concurrency} rounds={args.rounds} (best round shown)")
    print(f"{'':28} {'rows/s':>9} {'CPU s/1k rows':>14}")
    best = {}
    for name, runs in results.items():
        wall, cpu_s = min(runs)
        best[name] = (args.rows / wall, cpu_s / args.rows * 1000)
        print(f"{name:28} {best[name][0]:9.0f} {best[name][1]:14.3f}")
    b, p = best["bare aiohttp loop"], best["batch run (full pipeline)"]
    print(f"{'ratio batch/bare':28} {p[0] / b[0]:9.2f} {p[1] / b[1]:14.2f}")


if __name__ == "__main__":
    main()
