"""Stage 7: ``Result``s -> Parquet part files, atomically, one row per id at every instant.

Parts are written by one background thread (never on the event loop), each
atomically: temporary file, fsync, rename, fsync of the directory. A crash
loses at most the rows not yet flushed, and never leaves a half-written file
under a ``part-*.parquet`` name. Rows become Arrow columns once per part.

A row that replaces an older one (``--retry-errors``, ``--retry-truncated``)
is written *into the part that holds the old row*, which is replaced as a
whole: the id is in exactly one file before, during and after, so readers
(pandas, DuckDB, ``pyarrow.dataset``) never see it twice or miss it, even
after a kill -9.

A value that Arrow cannot store (a provider's odd reply that slipped past
the parser) costs only its own row: that row becomes an ``error`` row of type
``unstorable`` naming the column; every other row of the part is written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.answers import json_text
from batch.atomic import replacing
from batch.errors import OutputError
from batch.result import Result
from batch.store import RESULTS_DIR, next_part_number, part_path

BASE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("id", pa.string()), ("status", pa.string()), ("output", pa.string()), ("finish_reason", pa.string()),
    ("model", pa.string()), ("provider", pa.string()), ("fallback_level", pa.int32()),
    ("attempts", pa.int32()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("cached_tokens", pa.int64()), ("reasoning_tokens", pa.int64()),
    ("cost_usd", pa.float64()), ("cost_source", pa.string()), ("latency_ms", pa.float64()),
    ("error_type", pa.string()), ("error_message", pa.string()), ("request_hash", pa.string()),
    ("cached", pa.bool_()), ("billed_prompt_tokens", pa.int64()), ("billed_completion_tokens", pa.int64()),
    ("lane", pa.string()), ("batch_id", pa.string()),
]
RESPONSE_BODY = ("response_body", pa.string())  # only with output.raw_response
_CONVERSION_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError,
                      ValueError)


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


def _columns(rows: Sequence[Result], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*rows))  # one C-level transpose per part, not per row
    arrays = []
    n_base = 0
    for field in schema:
        i = _RESULT_INDEX.get(field.name)
        if i is None:
            break  # the kept input columns follow
        arrays.append(pa.array(columns[i] if rows else [], type=field.type))
        n_base += 1
    keeps = list(zip(*columns[_RESULT_INDEX["keep"]])) if rows and rows[0].keep else []
    for k in range(len(schema) - n_base):
        field = schema.field(n_base + k)
        values: Sequence[Any] = keeps[k] if keeps else [None] * len(rows)
        if pa.types.is_string(field.type):
            values = [v if v is None or isinstance(v, str) else json_text(v) for v in values]
        arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def to_table(rows: Sequence[Result], schema: pa.Schema) -> pa.Table:
    """Rows as one Arrow table. A row holding a value its column cannot store becomes an
    ``unstorable`` error row (that value dropped, named in the message); the others are unchanged."""
    try:
        return _columns(rows, schema)
    except _CONVERSION_ERRORS:
        return _columns([_storable(r, schema) for r in rows], schema)


def _storable(row: Result, schema: pa.Schema) -> Result:
    """``row``, or, if one of its values does not fit its column, an ``unstorable`` error row
    without those values (the message names the columns and shows the first value)."""
    bad = [(name, value) for name, value, typ in _cells(row, schema) if not _fits(value, typ)]
    if not bad:
        return row
    fields = row._asdict()
    keep = list(row.keep)
    keep_names = [f.name for f in schema if f.name not in _RESULT_INDEX]
    for name, _ in bad:
        if name in fields:
            fields[name] = None
        else:
            keep[keep_names.index(name)] = None
    first = bad[0][1]
    excerpt = first if isinstance(first, str) else json_text(first)
    fields.update(id=str(row.id), status="error", error_type="unstorable", keep=tuple(keep),
                  error_message=f"the answer cannot be stored: {', '.join(n for n, _ in bad)} does not fit its "
                                f"column type (value {excerpt[:200]!r})")
    return Result(**fields)


def _cells(row: Result, schema: pa.Schema) -> list[tuple[str, Any, pa.DataType]]:
    """(column, value, type) of one row, as ``_columns`` would store it."""
    cells = []
    k = 0
    for field in schema:
        if (i := _RESULT_INDEX.get(field.name)) is not None:
            cells.append((field.name, row[i], field.type))
        else:
            value = row.keep[k] if k < len(row.keep) else None
            if pa.types.is_string(field.type) and value is not None and not isinstance(value, str):
                value = json_text(value)
            cells.append((field.name, value, field.type))
            k += 1
    return cells


def _fits(value: Any, typ: pa.DataType) -> bool:
    try:
        pa.array([value], type=typ)
        return True
    except _CONVERSION_ERRORS:
        return False


class Sink:
    """Buffers Results and writes them as numbered parts; an async context manager."""

    def __init__(self, out_dir: Path, schema: pa.Schema, *, flush_rows: int, flush_seconds: float) -> None:
        self.dir = out_dir / RESULTS_DIR
        self.schema = schema
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.buffer: list[Result] = []  # rows of ids the output does not hold yet
        self.replacing: dict[int, list[Result]] = {}  # part number -> rows replacing rows in that part
        self.buffered = 0
        self.rows_written = 0
        self.parts_written = 0
        self._next_part = next_part_number(self.dir)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-sink")
        self._writing: asyncio.Future[None] | None = None
        self._last_flush = time.monotonic()
        self._closed = False
        self.error: OutputError | None = None

    async def __aenter__(self) -> Sink:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.dir}: cannot create the results directory: {exc.strerror or exc}") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def add(self, result: Result, replaces: int = -1) -> None:
        """Buffer a row; ``replaces`` is the number of the part holding this id's older row, if any."""
        if replaces < 0:
            self.buffer.append(result)
        else:
            self.replacing.setdefault(replaces, []).append(result)
        self.buffered += 1
        if self.buffered >= self.flush_rows:
            self.flush()

    @property
    def backlogged(self) -> bool:
        """A full buffer waits for the part being written: workers should ``await drain_writer()``."""
        return self.buffered >= self.flush_rows and self._writing is not None and not self._writing.done()

    async def drain_writer(self) -> None:
        """Wait for the part being written, then hand over the buffer (backpressure)."""
        if self._writing is not None:
            await asyncio.wait([self._writing])
        self.flush()

    def flush_if_due(self) -> None:
        if self.buffered and time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered rows to the writer thread; returns at once.

        One write at a time: while one runs, rows stay in the buffer (and
        workers wait once it is full), so at most 2 x flush_rows answered rows
        are ever not yet on disk, plus the requests in flight.
        """
        if not self.buffered:
            return
        if self._writing is not None:
            if not self._writing.done():
                return
            self._reap(self._writing)
        self._last_flush = time.monotonic()
        rows, self.buffer = self.buffer, []
        replacing, self.replacing = self.replacing, {}
        self.buffered = 0
        path = None
        if rows:
            path = part_path(self.dir, self._next_part)
            self._next_part += 1
        self._writing = asyncio.get_running_loop().run_in_executor(self._pool, self._write, rows, path, replacing)

    def _reap(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, OutputError) and self.error is None:
            self.error = exc
        elif exc is not None and self.error is None:
            self.error = OutputError(f"{self.dir}: cannot write results: {exc}")

    def _write(self, rows: list[Result], path: Path | None, replacing: dict[int, list[Result]]) -> None:
        """New rows as a new part; replacements into the parts holding their old rows (writer thread)."""
        if path is not None:
            self._write_part(path, to_table(rows, self.schema), len(rows))
        for number, new in replacing.items():
            target = part_path(self.dir, number)
            self._write_part(target, _replaced(target, to_table(new, self.schema)), len(new))

    def _write_part(self, path: Path, table: pa.Table, rows: int) -> None:
        try:
            with replacing(path) as tmp:
                pq.write_table(table, tmp, compression="zstd")
        except OSError as exc:
            raise OutputError(f"{path}: cannot write results ({exc.strerror or exc}); "
                              f"{rows} rows were not saved and will be redone on resume") from None
        self.rows_written += rows
        self.parts_written += 1

    async def drain(self) -> None:
        """Flush and wait until every buffered row is on disk (or has failed)."""
        while True:
            if self._writing is not None:
                await asyncio.wait([self._writing])
                self._reap(self._writing)
                self._writing = None
            if not self.buffered:
                return
            self.flush()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.drain()
        finally:
            self._pool.shutdown(wait=True)


def _replaced(path: Path, new: pa.Table) -> pa.Table:
    """The part at ``path`` with the rows of ``new``'s ids replaced by ``new``'s rows, which carry on what
    the old rows were billed (cost_usd and billed tokens count everything billed for an id, across runs)."""
    try:
        old = pq.read_table(path)
    except FileNotFoundError:
        return new  # the part was set aside as damaged meanwhile: the new rows are all there is
    replaced = pc.is_in(old["id"], value_set=new["id"])
    new = _carry_billing(old.filter(replaced), new)
    kept = old.filter(pc.invert(replaced))
    if kept.schema.equals(new.schema):
        return pa.concat_tables([kept, new])
    return pa.concat_tables([kept, new], promote_options="permissive")  # a part written before a --force


BILLING_COLUMNS = ("cost_usd", "billed_prompt_tokens", "billed_completion_tokens")


def _carry_billing(old: pa.Table, new: pa.Table) -> pa.Table:
    """``new`` with the old rows' billing added to each id's (a column older parts lack counts as nothing)."""
    columns = [c for c in BILLING_COLUMNS if c in old.column_names and c in new.column_names]
    if not columns or old.num_rows == 0:
        return new
    before = {rid: vals for rid, *vals in zip(old["id"].to_pylist(), *(old[c].to_pylist() for c in columns))}
    for i, name in enumerate(columns):
        added = [_plus(v, before.get(rid, [None] * len(columns))[i])
                 for rid, v in zip(new["id"].to_pylist(), new[name].to_pylist())]
        new = new.set_column(new.schema.get_field_index(name), new.schema.field(name),
                             pa.array(added, new.schema.field(name).type))
    return new


def _plus(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else a + b
