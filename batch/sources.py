"""Stage 2: an input file -> a stream of ``RowBatch``es.

Rows are read in batches and kept column-wise (one Python list per needed
column), so Arrow is converted to Python once per batch and JSONL is parsed
line by line with orjson; memory depends on the batch size, never on the
file size. Raises ``InputError`` naming the file and the line or row.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batch.errors import InputError

BATCH_ROWS = 1024
# Parquet is read through a buffered stream, one page at a time. pyarrow's default (pre_buffer) caches
# every column chunk it reads until the reader is closed: the whole file, whatever the row groups.
PARQUET_BUFFER_BYTES = 1 << 20
EXCERPT_CHARS = 80


class _Missing:
    """A column absent from a JSONL line (as opposed to present and null)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True, slots=True)
class RowBatch:
    """Consecutive rows, column-wise.

    ``start`` is the 0-based index of the first row among all data rows;
    ``lines`` holds each row's 1-based line number for line-oriented files
    (None for Parquet, where the row index is the location).
    """

    start: int
    columns: dict[str, list[Any]]
    lines: list[int] | None
    size: int

    def where(self, i: int) -> str:
        if self.lines is not None:
            return f"line {self.lines[i]}"
        return f"row {self.start + i}"


def count_rows(path: Path, fmt: str) -> int | None:
    """The number of data rows, cheaply, or None if it cannot be known up front."""
    try:
        if fmt == "parquet":
            return int(pq.ParquetFile(path).metadata.num_rows)
        with _open_text(path) as f:
            n = 0
            last = b"\n"
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
                last = chunk[-1:]
            return n + (last != b"\n")  # a final line without a newline
    except (OSError, EOFError, zlib.error, pa.ArrowException):
        return None  # read_batches reports the problem with its location


BadLine = Callable[[int, str], None]


class KeysSeen:
    """JSONL: which ``wanted`` fields no line has had yet, and the keys lines did have.

    A field that no line has is not a bad row but a job error (a template naming
    a column the input does not have); the keys that do occur are what the
    message offers instead. Lines are looked at only until every wanted field
    has been seen, so on a good input this costs one check per line.
    """

    def __init__(self, wanted: Sequence[str]) -> None:
        self.unseen = set(wanted)
        self.keys: dict[str, None] = {}  # in the order first seen

    def see(self, obj: dict[str, Any]) -> None:
        self.keys.update(dict.fromkeys(obj))
        self.unseen.difference_update(obj)


def read_batches(path: Path, fmt: str, columns: Sequence[str], on_bad_line: BadLine | None = None,
                 keys_seen: KeysSeen | None = None) -> Iterator[RowBatch]:
    """Yield the needed ``columns`` of every row of ``path`` in batches.

    A JSONL line that is not a JSON object raises InputError naming file:line,
    unless ``on_bad_line(lineno, message)`` is given: then it is reported there
    and skipped. ``keys_seen`` (JSONL) is shown each line until it has seen its fields.
    """
    if not path.exists():
        raise InputError(f"{path}: input file not found")
    if fmt == "parquet":
        yield from _read_parquet(path, columns)
    else:
        yield from _read_jsonl(path, columns, on_bad_line, keys_seen)


def _open_text(path: Path) -> IO[bytes]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]  # a GzipFile is a binary IO
    return open(path, "rb")


def _read_jsonl(path: Path, columns: Sequence[str], on_bad_line: BadLine | None,
                keys_seen: KeysSeen | None = None) -> Iterator[RowBatch]:
    start = 0
    lineno = 0
    cols: dict[str, list[Any]] = {c: [] for c in columns}
    lines: list[int] = []
    loads = orjson.loads
    try:
        with _open_text(path) as f:
            for line in f:
                lineno += 1
                if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]  # a UTF-8 byte order mark, as some exporters write
                if not line.strip():
                    continue
                try:
                    obj = loads(line)
                    what = "expected a JSON object per line"
                except orjson.JSONDecodeError as exc:
                    obj, what = None, _json_problem(str(exc))
                if not isinstance(obj, dict):
                    message = _bad_line(path, lineno, line, what)
                    if on_bad_line is None:
                        raise InputError(message)
                    on_bad_line(lineno, message)
                    continue
                if keys_seen is not None and keys_seen.unseen:
                    keys_seen.see(obj)
                for c in columns:
                    cols[c].append(obj.get(c, MISSING))
                lines.append(lineno)
                if len(lines) >= BATCH_ROWS:
                    yield RowBatch(start, cols, lines, len(lines))
                    start += len(lines)
                    cols = {c: [] for c in columns}
                    lines = []
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(f"{path}: compressed data is damaged or truncated after line {lineno}: {exc}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if lines:
        yield RowBatch(start, cols, lines, len(lines))


def _json_problem(error: str) -> str:
    """orjson's message, said for a person: an encoding hint, or the column within the line."""
    if "UTF-8" in error:
        return "not valid UTF-8 (the file must be UTF-8; convert it, e.g. with iconv -f latin1 -t utf-8)"
    where = error.rsplit(": line 1 ", 1)
    detail = f"{where[0]} at {where[1].split(' (')[0]}" if len(where) == 2 else error
    return f"not valid JSON: {detail}"


def _bad_line(path: Path, lineno: int, line: bytes, what: str) -> str:
    text = line.decode("utf-8", "replace").strip()
    excerpt = text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."
    return f"{path}:{lineno}: {what}: {excerpt}"


def _read_parquet(path: Path, columns: Sequence[str]) -> Iterator[RowBatch]:
    try:
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file: {exc}") from None
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(
            f"{path}: no column {', '.join(map(repr, missing))}; the file has {', '.join(names)}"
        )
    start = 0
    try:
        # One thread: batches are consumed one at a time, and decode threads keep ~10 MB of heaps.
        for rb in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(columns), use_threads=False):
            data = rb.to_pydict()
            yield RowBatch(start, {c: data[c] for c in columns}, None, rb.num_rows)
            start += rb.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read row group after row {start}: {exc}") from None
