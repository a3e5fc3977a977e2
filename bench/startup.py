"""Start-up: time from launching `batch run` to the simulator receiving its first request.

    .venv/bin/python bench/startup.py

Both clocks are CLOCK_MONOTONIC on the same machine, so the two processes'
timestamps compare directly.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import PYTHON, ROOT, sim_process, sim_stats, write_job, write_parquet


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="batch-start-"))
    try:
        with sim_process("--record-times") as url:
            for n in (1_000, 100_000):
                data = write_parquet(tmp / f"in{n}.parquet", n)
                job = write_job(tmp / f"job{n}.toml", data, url, 64)
                seen = len(sim_stats(url)["admissions"])
                t0 = time.monotonic()
                subprocess.run([PYTHON, "-m", "batch", "run", str(job), "--quiet", "--limit", "200"], cwd=ROOT,
                               check=True, capture_output=True)
                first = sim_stats(url)["admissions"][seen][0]
                print(f"input {n:>7} rows: first request {first - t0:.3f} s after launch")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
