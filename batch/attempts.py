"""The attempt log: one row per HTTP attempt, per cache hit and per provider-batch line.

``OUT/attempts/part-NNNNN.parquet`` is a Parquet dataset of its own, written
the way results are (atomic parts, one background thread, bounded memory):
what happened to every request, when, how long it took, what it cost, and
what the router did next (``then``). ``batch report`` draws it; pandas and
DuckDB read it directly.

Columns (``ATTEMPT_SCHEMA``): run_id, id, attempt (1-based per row and run; 0
for a cache hit), lane (online | cache | batch), provider, model, level (the
model's place in the row's chain), started (UTC), latency_ms, status (HTTP,
null when no response came), outcome (``ok`` or an error type), prompt_tokens,
completion_tokens, cost_usd (billed for this attempt), then (done | retry |
wait | repair | fallback | failed | stopped | second_answer: a batch line for a
row another lane answered first), error_message. A batch line's ``started`` is
when it was collected and its latency is null.

Workers only append to per-column lists (about a microsecond per attempt,
measured in bench/overhead.py); Arrow conversion and the write happen per
part on the writer thread.
"""

from __future__ import annotations

import concurrent.futures
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch.atomic import replacing
from batch.batch_lines import LineResult
from batch.store import next_part_number, part_path
from batch.target import Target

ATTEMPTS_DIR = "attempts"
ATTEMPT_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("id", pa.string()), ("attempt", pa.int32()), ("lane", pa.string()),
    ("provider", pa.string()), ("model", pa.string()), ("level", pa.int32()),
    ("started", pa.timestamp("us", tz="UTC")), ("latency_ms", pa.float64()), ("status", pa.int32()),
    ("outcome", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("cost_usd", pa.float64()), ("then", pa.string()), ("error_message", pa.string()),
])
_COLUMNS = ATTEMPT_SCHEMA.names[1:]  # run_id is one value per run, added when a part is written
FLUSH_ATTEMPTS = 20_000


class AttemptLog:
    """Collects attempts column-wise and writes them as parts; ``close()`` writes the rest."""

    def __init__(self, out_dir: Path, run_id: str, *, flush_seconds: float = 5.0) -> None:
        self.dir = out_dir / ATTEMPTS_DIR
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self.columns: dict[str, list[object]] = {name: [] for name in _COLUMNS}
        self.error: str | None = None
        self.rows_written = 0
        self._append = [self.columns[name].append for name in _COLUMNS]
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-attempts")
        self._writing: concurrent.futures.Future[None] | None = None
        self._last_flush = time.monotonic()
        self._next_part = 0
        self._closed = False

    def add(self, row_id: str, attempt: int, lane: str, provider: str, model: str, level: int, started: float,
            latency_ms: float | None, status: int | None, outcome: str, prompt_tokens: int | None,
            completion_tokens: int | None, cost_usd: float | None, then: str, message: str | None) -> None:
        """One attempt; ``started`` is a unix time."""
        for append, value in zip(self._append, (row_id, attempt, lane, provider, model, level, started, latency_ms,
                                                status, outcome, prompt_tokens, completion_tokens, cost_usd, then,
                                                message)):
            append(value)
        if len(self.columns["id"]) >= FLUSH_ATTEMPTS:
            self.flush()

    def add_batch_line(self, row_id: str, attempt: int, target: Target, line: LineResult,
                       billed: tuple[float, int, int], then: str) -> None:
        """One line of a provider batch, as it is collected: ``started`` is the collection time (when the row
        finished), latency is null (a batch's turnaround is in its record, not a request's latency)."""
        error = line.error
        outcome = (error.kind if error is not None else "bad_response" if line.reply is None
                   else "invalid_output" if then == "repair" else "ok")
        self.add(row_id, attempt, "batch", target.provider, target.model, 0, time.time(), None,
                 error.status if error is not None else 200, outcome, billed[1], billed[2], billed[0], then,
                 str(error) if error is not None else None)

    def flush_if_due(self) -> None:
        if self.columns["id"] and time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Hand the collected attempts to the writer thread (one part at a time; never blocks)."""
        if not self.columns["id"] or self.error is not None or self._closed:
            return
        if self._writing is not None:
            if not self._writing.done():
                return
            self._reap()
        self._last_flush = time.monotonic()
        columns, self.columns = self.columns, {name: [] for name in _COLUMNS}
        self._append = [self.columns[name].append for name in _COLUMNS]
        self._writing = self._pool.submit(self._write, columns)

    def _write(self, columns: dict[str, list[object]]) -> None:
        if not self._next_part:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._next_part = next_part_number(self.dir)
        n = len(columns["id"])
        started = [datetime.fromtimestamp(t, timezone.utc) for t in columns["started"]]  # type: ignore[arg-type]
        arrays = [pa.array([self.run_id] * n, pa.string())]
        for field in ATTEMPT_SCHEMA:
            if field.name != "run_id":
                values = started if field.name == "started" else columns[field.name]
                arrays.append(pa.array(values, type=field.type))
        table = pa.Table.from_arrays(arrays, schema=ATTEMPT_SCHEMA)
        with replacing(part_path(self.dir, self._next_part)) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        self._next_part += 1
        self.rows_written += n

    def _reap(self) -> None:
        assert self._writing is not None
        if (exc := self._writing.exception()) is not None and self.error is None:
            # the attempt log is for looking back: a failure stops it, never the run
            self.error = f"{self.dir}: cannot write the attempt log ({exc}); the results are not affected"
        self._writing = None

    def close(self) -> None:
        """Write what is left and stop the writer thread (blocks briefly; safe to call twice)."""
        if self._closed:
            return
        if self._writing is not None:
            concurrent.futures.wait([self._writing])
            self._reap()
        self.flush()
        self._closed = True
        if self._writing is not None:
            concurrent.futures.wait([self._writing])
            self._reap()
        self._pool.shutdown(wait=True)
