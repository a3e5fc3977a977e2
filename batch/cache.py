"""The response cache: answers already paid for, reused instead of sent again.

Content-addressed: the key is a hash of the provider's configured base URL
and the exact request body (model, messages and every request field), so two
requests share a key only when they ask the same thing of the same endpoint;
any job may reuse any other job's answers. The value is the reply's JSON body
as received, and a hit is parsed by the same code as a live reply.

Storage is one SQLite file in WAL mode (standard library): readers never
block the writer, several batch processes may share the file (a busy writer
is waited for), and a crash or kill -9 loses at most the rows of the
transaction not yet committed; it never corrupts the file. Lookups run on the
event loop (a primary-key read, a few microseconds: see bench/overhead.py
--cache). Writes are collected and committed in one transaction per
``COMMIT_ROWS`` rows (and at close) on a single background thread with its own
connection.

Modes (``[run] cache``): ``off``; ``read-write`` (deterministic requests are
looked up first and stored after); ``replay`` (nothing is sent: a request not
in the cache becomes an ``error`` row of type ``cache_miss``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from batch.errors import JobError

COMMIT_ROWS = 500
PREFETCH_CHUNK = 500  # keys per IN query (SQLite allows 32,766 variables; older builds 999)
BUSY_TIMEOUT_MS = 10_000
CACHE_FILE = "responses.sqlite3"
_NOT_PREFETCHED = object()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key     BLOB PRIMARY KEY,  -- blake2b-160 of base URL, NUL, request body (a rowid table: bodies are
                               -- too large for WITHOUT ROWID; inserts measured 3x faster)
    body    BLOB NOT NULL,     -- the reply's JSON body as received
    model   TEXT,              -- the model asked (for people inspecting the file)
    created REAL NOT NULL      -- unix time it was stored
)
"""


def default_cache_path() -> Path:
    """``$BATCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/batch``, else ``~/.cache/batch``; one file per user."""
    if d := os.environ.get("BATCH_CACHE_DIR"):
        return Path(d).expanduser() / CACHE_FILE
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "batch" / CACHE_FILE


def replay_problem(path: Path) -> str | None:
    """Why ``cache = "replay"`` cannot run with the cache at ``path``, or None."""
    if path.exists():
        return None
    return (f"run.cache = \"replay\": no cache at {path}; record one first with cache = \"read-write\" "
            "(or --cache read-write), or set run.cache_path")


def cache_key(salt: bytes, body: bytes) -> bytes:
    """The key of a request: ``salt`` is the provider's base URL and a NUL byte."""
    return hashlib.blake2b(salt + body, digest_size=20).digest()


class ResponseCache:
    """One run's handle on the cache file. Create and use it on the event loop's thread."""

    def __init__(self, path: Path, mode: str) -> None:
        if mode not in ("read-write", "replay"):
            raise ValueError(f"cache mode {mode!r}")
        self.path = path
        self.writable = mode == "read-write"
        self.hits = 0  # rows answered from the cache (counted by the router)
        self.misses = 0  # rows looked up and not found
        self.error: str | None = None  # the first write failure; writes stop after it
        self._prefetched: dict[bytes, bytes | None] = {}  # looked up by prefetch, not yet asked for
        self._pending: dict[bytes, tuple[bytes, str]] = {}  # put, not yet handed to the writer
        self._committing: dict[bytes, tuple[bytes, str]] = {}  # being committed now
        self._writing: concurrent.futures.Future[None] | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._closed = False
        self._reader = self._connect(read_only=not self.writable)

    def _connect(self, *, read_only: bool) -> sqlite3.Connection:
        try:
            if read_only:
                if problem := replay_problem(self.path):
                    raise JobError(problem)
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
            else:
                _create_private(self.path)
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
                conn.execute(_SCHEMA)
                conn.commit()
            conn.execute("SELECT 1 FROM responses LIMIT 1").fetchall()
        except (sqlite3.Error, OSError) as exc:
            raise JobError(f"response cache {self.path}: cannot open: {exc}; move the file away to start "
                           f"a new cache, or set run.cache = \"off\"") from None
        return conn

    def prefetch(self, keys: Sequence[bytes]) -> None:
        """Look up a whole input batch in a few queries; ``get`` then answers these keys from memory.

        One SELECT per row cost ~45 us inside a busy run; IN queries of PREFETCH_CHUNK keys
        amortise the statement and its read transaction (see bench/overhead.py --cache).
        """
        found: dict[bytes, bytes] = {}
        try:
            for i in range(0, len(keys), PREFETCH_CHUNK):
                chunk = keys[i:i + PREFETCH_CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(self._reader.execute(f"SELECT key, body FROM responses WHERE key IN ({marks})",
                                                  chunk).fetchall())
        except sqlite3.Error:
            return  # get() asks again, one key at a time
        for k in keys:
            self._prefetched[k] = found.get(k)

    def get(self, key: bytes) -> bytes | None:
        """The stored body for ``key``, or None. (The router counts hits and misses per row.)"""
        found = self._pending.get(key) or self._committing.get(key)
        prefetched = self._prefetched.pop(key, _NOT_PREFETCHED)
        if found:
            return found[0]
        if prefetched is not _NOT_PREFETCHED:
            return prefetched  # type: ignore[return-value]
        try:
            row = self._reader.execute("SELECT body FROM responses WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error:
            row = None  # an unreadable entry is a miss: the request is sent (or fails in replay)
        return row[0] if row else None

    def put(self, key: bytes, body: bytes, model: str) -> None:
        """Store a reply; committed in the background once COMMIT_ROWS are collected."""
        if not self.writable or self.error is not None:
            return
        self._pending[key] = (body, model)
        if len(self._pending) >= COMMIT_ROWS:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._writing is not None:
            if not self._writing.done():
                return  # the next put or close hands over; pending rows stay visible to get()
            self._reap()
        if not self._pending or self.error is not None:
            return
        self._committing, self._pending = self._pending, {}
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-cache")
        self._writing = self._pool.submit(self._commit, list(self._committing.items()))

    def _commit(self, rows: list[tuple[bytes, tuple[bytes, str]]]) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect(read_only=False)
        now = time.time()
        with conn:  # one transaction; INSERT OR IGNORE: the first answer stored for a key stays
            conn.executemany("INSERT OR IGNORE INTO responses (key, body, model, created) VALUES (?, ?, ?, ?)",
                             [(k, b, m, now) for k, (b, m) in rows])

    def _wait(self) -> None:
        if self._writing is not None:
            concurrent.futures.wait([self._writing])
            self._reap()

    def _reap(self) -> None:
        assert self._writing is not None
        exc = self._writing.exception()
        if exc is not None and self.error is None:
            self.error = f"response cache {self.path}: cannot store answers: {exc}"
        self._committing = {}
        self._writing = None

    def close(self) -> None:
        """Commit everything put so far, then close both connections (blocks briefly; safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._wait()
            self._hand_over()
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.submit(self._close_writer).result()
                self._pool.shutdown(wait=True)
            self._reader.close()

    def _close_writer(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


def _create_private(path: Path) -> None:
    """The cache holds prompts and answers: its folder (when batch makes it) is 0700 and its file 0600.

    SQLite creates the -wal and -shm files with the database file's mode."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


@dataclass(frozen=True, slots=True)
class CacheInfo:
    path: str
    entries: int
    bytes: int
    models: dict[str, int]  # answers per model
    oldest: float | None  # unix time an answer was stored
    newest: float | None


def describe(path: Path) -> CacheInfo:
    """What a cache file holds: entries, bytes, per-model counts, oldest and newest entry."""
    if not path.exists():
        raise JobError(f"{path}: no response cache there")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            entries, oldest, newest = conn.execute(
                "SELECT count(*), min(created), max(created) FROM responses").fetchone()
            models = dict(conn.execute("SELECT model, count(*) FROM responses GROUP BY model ORDER BY 2 DESC"))
    except sqlite3.Error as exc:
        raise JobError(f"{path}: not a readable response cache: {exc}") from None
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    return CacheInfo(str(path), entries, size, models, oldest, newest)


def prune(path: Path, older_than_seconds: float) -> int:
    """Delete entries stored more than ``older_than_seconds`` ago, then give the space back; returns rows deleted.

    Age is time since an answer was *stored*: a still-used entry goes too, and the
    next read-write run stores it again (at its cost). Safe while other runs use the file.
    """
    if not path.exists():
        raise JobError(f"{path}: no response cache there")
    cutoff = time.time() - older_than_seconds
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)) as conn:
            with conn:
                deleted = conn.execute("DELETE FROM responses WHERE created < ?", (cutoff,)).rowcount
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as exc:
        raise JobError(f"{path}: cannot prune: {exc}") from None
    return int(deleted)
