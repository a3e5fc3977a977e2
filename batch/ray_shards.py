"""The Ray engine's per-row result store: every answer on disk the moment it comes, before Ray sees it.

Ray retries a whole block when an actor dies, and its own checkpoint commits
per block (RAY.md, A3): both would send again, and pay again, rows already
answered. So each Ray worker appends each ``Result``, the moment the router
returns it, to its own shard file::

    OUT/ray/RUN_ID/WORKER.shard     records: 4-byte little-endian length, then the pickled Result

Pickle rather than JSON lines or Arrow IPC: a Result round-trips exactly
(bytes bodies, parsed values of any type, the kept input columns), one
record costs one ``dumps``, and the same bytes go back to the driver. The
files are batch's own, read only by the same version of batch.

A record is one ``write`` on an ``O_APPEND`` descriptor: a worker killed a
microsecond later loses nothing (the kernel has the bytes); a half record at
the end (a power cut) is ignored. Before sending, a worker skips ids already
in any shard of the run (``ShardIndex``) and returns their stored results, so
a retried block re-pays only what was in flight on the dead actor.

The driver is the only writer of ``results/``: it writes the rows Ray hands
back through the usual Sink, and deletes a run's shards once the sink has
written them. Shards left by a driver that was killed are folded into parts
at the start of the next run (``fold_shards``), before the resume decides
what is done: results/ holds one row per id at every instant.
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from batch.result import Result
from batch.sinks import Sink
from batch.store import RESULTS_DIR, SHARDS_DIR, Ledger, part_files, read_parts

SUFFIX = ".shard"
HEADER = struct.Struct("<I")
SAME_ROW = ("status", "output", "attempts", "latency_ms", "error_message")  # a row already written from a shard


def run_folder(out: Path, run_id: str) -> Path:
    return out / SHARDS_DIR / run_id


class ShardWriter:
    """Appends Results to one worker's shard; ``close()`` is safe to call twice."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, result: Result) -> bytes:
        """Store ``result`` (one system call); returns its pickled bytes."""
        data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        assert self._fd is not None, "shard closed"
        os.write(self._fd, HEADER.pack(len(data)) + data)
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(end offset, pickled Result) of each complete record."""
    offset = 0
    while offset + HEADER.size <= len(data):
        (size,) = HEADER.unpack_from(data, offset)
        end = offset + HEADER.size + size
        if end > len(data):
            return  # a half-written record: never answered as far as anyone knows
        yield end, data[offset + HEADER.size:end]
        offset = end


class ShardIndex:
    """The ids answered in one run's shards, by any worker, read incrementally (``refresh``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.stored: dict[str, bytes] = {}  # id -> pickled Result
        self._offsets: dict[Path, int] = {}

    def refresh(self) -> None:
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            start = self._offsets.get(path, 0)
            try:
                with path.open("rb") as f:
                    f.seek(start)
                    data = f.read()
            except FileNotFoundError:
                continue
            for end, record in _records(data):
                self.stored.setdefault(pickle.loads(record).id, record)
                self._offsets[path] = start + end


def leftover_results(out: Path) -> Iterator[Result]:
    """Every Result in the shards of earlier runs (their drivers were killed), one per id."""
    seen: set[str] = set()
    for path in sorted((out / SHARDS_DIR).glob(f"*/*{SUFFIX}")):
        for _, record in _records(path.read_bytes()):
            result: Result = pickle.loads(record)
            if result.id not in seen:
                seen.add(result.id)
                yield result


async def fold_shards(out: Path, schema: pa.Schema, *, flush_rows: int, flush_seconds: float) -> int:
    """Write the rows of leftover shards into results parts, then delete the shards; returns rows written.

    An id whose part already holds the shard's row (the killed driver wrote it)
    is left alone; an id whose part holds an older row (a --retry-errors run)
    is replaced there, as the sink does for any redone row."""
    folder = out / SHARDS_DIR
    if not folder.is_dir():
        return 0
    results = list(leftover_results(out))
    written = 0
    if results:
        ledger = Ledger.read(out)
        parts = ledger.parts_of(pa.chunked_array([[r.id for r in results]], pa.string())).to_pylist()
        already = _rows_in_parts(out, [r.id for r, p in zip(results, parts) if p >= 0])
        async with Sink(out, schema, flush_rows=flush_rows, flush_seconds=flush_seconds) as sink:
            for result, part in zip(results, parts):
                if part >= 0 and already.get(result.id) == tuple(getattr(result, k) for k in SAME_ROW):
                    continue
                sink.add(result, part)
                written += 1
            await sink.drain()
            if sink.error is not None:
                raise sink.error
    shutil.rmtree(folder)  # every row is in a part now
    return written


def _rows_in_parts(out: Path, ids: list[str]) -> dict[str, tuple[object, ...]]:
    if not ids:
        return {}
    wanted = pa.array(ids, pa.string())
    rows: dict[str, tuple[object, ...]] = {}
    for _, table in read_parts(part_files(out / RESULTS_DIR), ["id", *SAME_ROW]):
        table = table.filter(pc.is_in(table["id"], value_set=wanted))
        for row in table.to_pylist():
            rows[row["id"]] = tuple(row[k] for k in SAME_ROW)
    return rows


def drop_run(out: Path, run_id: str) -> None:
    """A run's rows are all in parts: its shards go."""
    shutil.rmtree(run_folder(out, run_id), ignore_errors=True)
    folder = out / SHARDS_DIR
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
