"""Memory: peak RSS of `batch estimate` and of `batch run --limit N` on 10,000 and 1,000,000 rows,
in both Parquet layouts: many row groups, and one row group of a million rows.

    .venv/bin/python bench/memory.py

Each command runs in its own process; peak RSS is its ru_maxrss. The run
sends the same number of rows (--limit) in every case, so the difference is
what the input's size costs: the scan of every id, the reader, the ledger.
pandas and pyarrow write one row group per 1Mi rows by default, so a typical
1M-row file is a single row group: that layout is measured beside the
10,000-row-group one.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common import PYTHON, ROOT, sim_process, write_job

LIMIT = 10_000
CASES = (  # (label, rows, row-group size)
    ("10k rows, 1 row group", 10_000, 10_000),
    ("1M rows, 10k-row groups", 1_000_000, 10_000),
    ("1M rows, 1 row group", 1_000_000, 1 << 20),
)
_RNG = random.Random(7)
_SYLLABLES = ("ka", "to", "ri", "mo", "se", "lu", "an", "er", "in", "ou", "th", "qu", "ze", "pa", "vi", "no", "st")
VOCABULARY = ["".join(_RNG.choice(_SYLLABLES) for _ in range(_RNG.randint(1, 4))) for _ in range(5000)]


def texts(n: int) -> list[str]:
    """About 150 characters of words per row, drawn from 5,000: they compress about as real text
    does (1.7x with snappy), so a row group's column chunk is as large as a real one's."""
    rng = random.Random(1)
    out = []
    for i in range(n):
        words = " ".join(rng.choices(VOCABULARY, k=40))
        out.append(f"Review {i}: {words}"[:150])
    return out


def write_input(path: Path, n: int, group: int) -> Path:
    if not path.exists():
        table = pa.table({"id": [f"r{i}" for i in range(n)], "text": texts(n)})
        pq.write_table(table, path, row_group_size=group)
    return path


def peak(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one command, measured by GNU time on that process alone."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert proc.returncode in (0, 1, 3), proc.stderr  # 3: --limit left rows for a rerun
    return wall, int(proc.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="batch-mem-"))
    rows = []
    try:
        with sim_process() as url:
            for i, (label, n, group) in enumerate(CASES):
                data = write_input(tmp / f"in{i}.parquet", n, group)
                job = write_job(tmp / f"job{i}.toml", data, url, 64)
                est = peak([PYTHON, "-m", "batch", "estimate", str(job)])
                run = peak([PYTHON, "-m", "batch", "run", str(job), "--quiet", "--limit", str(LIMIT)])
                rows.append((label, est, run))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"~150-character texts; run sends --limit {LIMIT} rows in every case")
    print(f"{'input':>26} {'estimate s':>11} {'estimate MB':>12} {'run --limit s':>14} {'run MB':>8}")
    for label, (es, em), (rs, rm) in rows:
        print(f"{label:>26} {es:11.1f} {em:12.0f} {rs:14.1f} {rm:8.0f}")
    _, (_, em0), (_, rm0) = rows[0]
    for label, (_, em), (_, rm) in rows[1:]:
        print(f"{'ratio to 10k, ' + label.split(', ')[1]:>26} {'':11} {em / em0:12.2f} {'':14} {rm / rm0:8.2f}")


if __name__ == "__main__":
    main()
