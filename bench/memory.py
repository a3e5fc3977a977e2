"""Memory: peak RSS of `batch estimate` and of `batch run --limit N` on 10,000 and 1,000,000 rows.

    .venv/bin/python bench/memory.py

Each command runs in its own process; peak RSS is its ru_maxrss. The run
sends the same number of rows (--limit) in both cases, so the difference is
what the input's size costs: the scan of every id, the reader, the ledger.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import PYTHON, ROOT, sim_process, write_job, write_parquet

SIZES = (10_000, 1_000_000)
LIMIT = 10_000


def peak(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert proc.returncode in (0, 1), proc.stderr
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: measure in ascending order
    return wall, max(after, before) / 1024


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="batch-mem-"))
    rows = []
    try:
        with sim_process() as url:
            for n in SIZES:
                data = write_parquet(tmp / f"in{n}.parquet", n)
                job = write_job(tmp / f"job{n}.toml", data, url, 64)
                est = peak([PYTHON, "-m", "batch", "estimate", str(job)])
                run = peak([PYTHON, "-m", "batch", "run", str(job), "--quiet", "--limit", str(LIMIT)])
                rows.append((n, est, run))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'input rows':>12} {'estimate s':>11} {'estimate MB':>12} {'run --limit s':>14} {'run MB':>8}")
    for n, (es, em), (rs, rm) in rows:
        print(f"{n:12} {es:11.1f} {em:12.0f} {rs:14.1f} {rm:8.0f}")
    (_, (_, em0), (_, rm0)), (_, (_, em1), (_, rm1)) = rows
    print(f"{'ratio 1M/10k':>12} {'':11} {em1 / em0:12.2f} {'':14} {rm1 / rm0:8.2f}")


if __name__ == "__main__":
    main()
