"""Memory: peak RSS of `batch estimate` and of `batch run --limit N` on 10,000 and 1,000,000 rows.

    .venv/bin/python bench/memory.py

Each command runs in its own process; peak RSS is its ru_maxrss. The run
sends the same number of rows (--limit) in both cases, so the difference is
what the input's size costs: the scan of every id, the reader, the ledger.
Both files use the same row-group size: pyarrow decodes one row group at a
time, so a file written as one huge row group needs that group in memory
whatever the tool.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import PYTHON, ROOT, sim_process, write_job, write_parquet

SIZES = (10_000, 1_000_000)
LIMIT = 10_000
ROW_GROUP = 10_000  # both files in the same layout: Parquet is decoded a row group at a time


def peak(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one command, measured by GNU time on that process alone."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert proc.returncode in (0, 1), proc.stderr
    return wall, int(proc.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="batch-mem-"))
    rows = []
    try:
        with sim_process() as url:
            for n in SIZES:
                data = write_parquet(tmp / f"in{n}.parquet", n, group=ROW_GROUP)
                job = write_job(tmp / f"job{n}.toml", data, url, 64)
                est = peak([PYTHON, "-m", "batch", "estimate", str(job)])
                run = peak([PYTHON, "-m", "batch", "run", str(job), "--quiet", "--limit", str(LIMIT)])
                rows.append((n, est, run))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"row groups of {ROW_GROUP} rows; run sends --limit {LIMIT} rows in both cases")
    print(f"{'input rows':>12} {'estimate s':>11} {'estimate MB':>12} {'run --limit s':>14} {'run MB':>8}")
    for n, (es, em), (rs, rm) in rows:
        print(f"{n:12} {es:11.1f} {em:12.0f} {rs:14.1f} {rm:8.0f}")
    (_, (_, em0), (_, rm0)), (_, (_, em1), (_, rm1)) = rows
    print(f"{'ratio 1M/10k':>12} {'':11} {em1 / em0:12.2f} {'':14} {rm1 / rm0:8.2f}")


if __name__ == "__main__":
    main()
