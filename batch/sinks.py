"""Stage 7: ``Result``s -> Parquet part files, the resume ledger, the manifest.

Parts are written by one background thread (never on the event loop), each
atomically: temporary file, fsync, rename, fsync of the directory. A crash
loses at most the rows not yet flushed, and never leaves a half-written file
under a ``part-*.parquet`` name. Rows become Arrow columns once per part.

The ledger reads ``id`` and ``status`` of existing parts so that a rerun
skips ids already answered; it stays in Arrow (no Python set per id).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.atomic import fsync_dir, replacing, write_atomic
from batch.errors import OutputError
from batch.result import Result

RESULTS_DIR = "results"
MANIFEST = "manifest.json"
_PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")

BASE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("id", pa.string()), ("status", pa.string()), ("output", pa.string()), ("finish_reason", pa.string()),
    ("model", pa.string()), ("provider", pa.string()), ("fallback_level", pa.int32()),
    ("attempts", pa.int32()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("cached_tokens", pa.int64()), ("reasoning_tokens", pa.int64()),
    ("cost_usd", pa.float64()), ("cost_source", pa.string()), ("latency_ms", pa.float64()),
    ("error_type", pa.string()), ("error_message", pa.string()), ("request_hash", pa.string()),
    ("cached", pa.bool_()),
]
RESPONSE_BODY = ("response_body", pa.string())  # only with output.raw_response


def result_schema(keep: Sequence[tuple[str, pa.DataType]], *, raw_response: bool = False,
                  parsed: pa.DataType | None = None) -> pa.Schema:
    """The results' columns: BASE_FIELDS, ``parsed`` after ``output`` when the job has an
    [output_format], ``response_body`` with output.raw_response, then the kept input columns."""
    base = list(BASE_FIELDS)
    if parsed is not None:
        base.insert(3, ("parsed", parsed))
    if raw_response:
        base.append(RESPONSE_BODY)
    names = set(Result._fields)  # a kept column never takes the name of a result column
    extra = [(f"input_{n}" if n in names else n, t) for n, t in keep]
    return pa.schema(base + extra)


_RESULT_INDEX = {name: i for i, name in enumerate(Result._fields)}


def _to_table(rows: list[Result], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*rows))  # one C-level transpose per part, not per row
    arrays = []
    n_base = 0
    for field in schema:
        i = _RESULT_INDEX.get(field.name)
        if i is None:
            break  # the kept input columns follow
        arrays.append(pa.array(columns[i], type=field.type))
        n_base += 1
    keeps = list(zip(*columns[_RESULT_INDEX["keep"]])) if rows and rows[0].keep else []
    for k in range(len(schema) - n_base):
        field = schema.field(n_base + k)
        values: Sequence[Any] = keeps[k] if keeps else [None] * len(rows)
        if pa.types.is_string(field.type):
            values = [v if v is None or isinstance(v, str) else orjson.dumps(v).decode() for v in values]
        arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


class Sink:
    """Buffers Results and writes them as numbered parts; an async context manager."""

    def __init__(self, out_dir: Path, schema: pa.Schema, *, flush_rows: int, flush_seconds: float) -> None:
        self.dir = out_dir / RESULTS_DIR
        self.schema = schema
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.buffer: list[Result] = []
        self.rows_written = 0
        self.parts_written = 0
        self._next_part = next_part_number(self.dir)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-sink")
        self._writing: asyncio.Future[None] | None = None
        self._last_flush = time.monotonic()
        self.error: OutputError | None = None

    async def __aenter__(self) -> Sink:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.dir}: cannot create the results directory: {exc.strerror or exc}") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def add(self, result: Result) -> None:
        self.buffer.append(result)
        if len(self.buffer) >= self.flush_rows:
            self.flush()

    @property
    def backlogged(self) -> bool:
        """A full buffer waits for the part being written: workers should ``await drain_writer()``."""
        return len(self.buffer) >= self.flush_rows and self._writing is not None and not self._writing.done()

    async def drain_writer(self) -> None:
        """Wait for the part being written, then hand over the buffer (backpressure)."""
        if self._writing is not None:
            await asyncio.wait([self._writing])
        self.flush()

    def flush_if_due(self) -> None:
        if self.buffer and time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered rows to the writer thread; returns at once.

        One part is written at a time: while it is, rows stay in the buffer (and
        workers wait once it is full), so at most 2 x flush_rows answered rows
        are ever not yet on disk, plus the requests in flight.
        """
        if not self.buffer:
            return
        if self._writing is not None:
            if not self._writing.done():
                return
            self._reap(self._writing)
        self._last_flush = time.monotonic()
        rows, self.buffer = self.buffer, []
        path = self.dir / f"part-{self._next_part:05d}.parquet"
        self._next_part += 1
        self._writing = asyncio.get_running_loop().run_in_executor(self._pool, self._write, rows, path)

    def _reap(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, OutputError) and self.error is None:
            self.error = exc
        elif exc is not None and self.error is None:
            self.error = OutputError(f"{self.dir}: cannot write results: {exc}")

    def _write(self, rows: list[Result], path: Path) -> None:
        table = _to_table(rows, self.schema)
        try:
            with replacing(path) as tmp:
                pq.write_table(table, tmp, compression="zstd")
        except OSError as exc:
            raise OutputError(f"{path}: cannot write results ({exc.strerror or exc}); "
                              f"{len(rows)} rows were not saved and will be redone on resume") from None
        self.rows_written += len(rows)
        self.parts_written += 1

    async def drain(self) -> None:
        """Flush and wait until every buffered row is on disk (or has failed)."""
        while True:
            if self._writing is not None:
                await asyncio.wait([self._writing])
                self._reap(self._writing)
                self._writing = None
            if not self.buffer:
                return
            self.flush()

    async def close(self) -> None:
        try:
            await self.drain()
        finally:
            self._pool.shutdown(wait=True)


def next_part_number(results: Path) -> int:
    highest = 0
    if results.is_dir():
        for p in results.iterdir():
            if m := _PART_RE.match(p.name):
                highest = max(highest, int(m.group(1)))
    return highest + 1


def part_files(results: Path) -> list[Path]:
    if not results.is_dir():
        return []
    return sorted((p for p in results.iterdir() if _PART_RE.match(p.name)), key=lambda p: p.name)


class Ledger:
    """What the output already holds, one entry per id; answers "skip this id?" per batch in Arrow."""

    def __init__(self, ids: pa.Array, status: pa.Array, finish: pa.Array) -> None:
        self.ids = ids
        self.status = status
        self.finish = finish

    @classmethod
    def read(cls, out_dir: Path) -> Ledger:
        tables = [pq.read_table(p, columns=["id", "status", "finish_reason"]) for p in part_files(out_dir / RESULTS_DIR)]
        if not tables:
            empty = pa.array([], pa.string())
            return cls(empty, empty, empty)
        t = pa.concat_tables(tables).combine_chunks()
        return cls(t["id"].chunk(0) if t.num_rows else pa.array([], pa.string()),
                   t["status"].chunk(0) if t.num_rows else pa.array([], pa.string()),
                   t["finish_reason"].chunk(0) if t.num_rows else pa.array([], pa.string()))

    @property
    def ok(self) -> int:
        return int(pc.sum(pc.equal(self.status, "ok")).as_py() or 0)

    @property
    def errors(self) -> int:
        return len(self.ids) - self.ok

    def skip_set(self, *, retry_errors: bool, retry_truncated: bool) -> pa.Array:
        """Ids this run leaves alone: ok rows, and error rows unless they are to be redone."""
        keep = pc.equal(self.status, "ok") if retry_errors else pa.array([True] * len(self.ids))
        if retry_truncated and len(self.ids):
            keep = pc.and_(keep, pc.invert(pc.fill_null(pc.equal(self.finish, "length"), False)))
        return pc.filter(self.ids, keep) if len(self.ids) else self.ids


def set_aside_damaged(out_dir: Path) -> list[str]:
    """Rename part files that cannot be read to hidden ``.NAME.damaged``; their rows are redone."""
    damaged = []
    for path in part_files(out_dir / RESULTS_DIR):
        try:
            pq.read_metadata(path)
            pq.read_table(path, columns=["id", "status"])
        except (pa.ArrowException, OSError):
            path.rename(path.with_name(f".{path.name}.damaged"))
            damaged.append(path.name)
    return damaged


def reconcile(out_dir: Path) -> int:
    """Keep only the newest row of every id: rewrite older parts without superseded rows.

    A rerun with --retry-errors or --retry-truncated writes the new answer in a
    new part first; this then removes the old row, each older part replaced
    atomically. A crash in between leaves both rows, and the next run's
    reconcile (which runs first) finishes the job. Returns rows removed.
    """
    parts = part_files(out_dir / RESULTS_DIR)
    if len(parts) < 2:
        return 0
    ids = [pq.read_table(p, columns=["id"])["id"] for p in parts]
    numbered = pa.table({
        "id": pa.chunked_array([c for col in ids for c in col.chunks], pa.string()),
        "part": pa.array([i for i, col in enumerate(ids) for _ in range(len(col))], pa.int32()),
    })
    latest = numbered.group_by("id").aggregate([("part", "max"), ("part", "count")])
    dup = latest.filter(pc.greater(latest["part_count"], 1))
    if dup.num_rows == 0:
        return 0
    newest = dict(zip(dup["id"].to_pylist(), dup["part_max"].to_pylist()))
    removed = 0
    for i, path in enumerate(parts):
        stale = [rid in newest and newest[rid] != i for rid in ids[i].to_pylist()]
        if not any(stale):
            continue
        table = pq.read_table(path)
        kept = table.filter(pc.invert(pa.array(stale)))
        removed += table.num_rows - kept.num_rows
        if kept.num_rows == 0:
            path.unlink()
            fsync_dir(path.parent)
        else:
            with replacing(path) as tmp:
                pq.write_table(kept, tmp, compression="zstd")
    return removed


def compact(out_dir: Path, dest: Path) -> int:
    """Write the whole results dataset as one Parquet file (atomically); returns its rows."""
    parts = part_files(out_dir / RESULTS_DIR)
    if not parts:
        raise OutputError(f"{out_dir}: no results to compact")
    schema = pq.read_schema(parts[0])
    rows = 0
    try:
        with replacing(dest) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for path in parts:  # one part in memory at a time
                table = pq.read_table(path).cast(schema)
                writer.write_table(table)
                rows += table.num_rows
    except OSError as exc:
        raise OutputError(f"{dest}: cannot write: {exc.strerror or exc}") from None
    return rows


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST
    try:
        return orjson.loads(path.read_bytes())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise OutputError(f"{path}: unreadable manifest ({exc}); move it away or run with --fresh") from None


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    try:
        write_atomic(out_dir / MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    except OSError as exc:
        raise OutputError(f"{out_dir / MANIFEST}: cannot write the manifest: {exc.strerror or exc}") from None
