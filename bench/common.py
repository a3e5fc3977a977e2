"""Shared helpers for the benchmarks: a simulator in its own process, inputs, job files."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def sim_process(*args: str) -> Iterator[str]:
    """`batch sim` in its own process; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "batch", "sim", "--port", str(port), *args], stdout=subprocess.PIPE,
                            cwd=ROOT)
    assert proc.stdout is not None
    proc.stdout.readline()  # "listening on ..."
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait()


def sim_stats(base_url: str) -> dict[str, Any]:
    root = base_url.removesuffix("/v1")
    return json.loads(urllib.request.urlopen(f"{root}/_sim/stats").read())  # type: ignore[no-any-return]


def texts(n: int) -> list[str]:
    return [f"Label the sentiment of review {i} (positive/negative/neutral): it was fine" for i in range(n)]


def write_parquet(path: Path, n: int, group: int = 100_000) -> Path:
    if not path.exists():
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "text": texts(n)}), path, row_group_size=group)
    return path


def write_job(path: Path, input_path: Path, url: str, concurrency: int, **run: Any) -> Path:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in run.items())
    path.write_text(f"""
[input]
path = "{input_path}"
id_column = "id"
template = "{{text}}"
[output]
path = "{path.parent / (path.stem + '-out')}"
[request]
temperature = 0
max_tokens = 5
[[models]]
provider = "local"
model = "openai/gpt-4.1-mini"
[providers.local]
base_url = "{url}"
[run]
concurrency = {concurrency}
{extra}""")
    return path
