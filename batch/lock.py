"""One writer per output directory: an OS lock held for the whole run.

``OutputLock`` takes ``fcntl.flock`` on ``OUT/.batch.lock`` without waiting.
The kernel drops the lock when its process ends, however it ends, so a kill
-9 never leaves a stale lock behind. A second ``run``, ``compact`` or
``--fresh`` on a locked output fails at once (``OutputError``, exit 2) before
anything is read or sent, and says which process holds it: the holder writes
its pid, host, command and start time into the lock file.

Readers (``stats``, ``export``, ``report``) never take the lock: every file
batch writes appears atomically (batch/atomic.py), so they see either the old
or the new version of a file, never half of one.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

import orjson

from batch.errors import OutputError

LOCK_FILE = ".batch.lock"


class OutputLock:
    """``with OutputLock(out_dir, "batch run job.toml"):`` holds the directory for one writer."""

    def __init__(self, out_dir: Path, command: str | None = None) -> None:
        self.dir = out_dir
        self.path = out_dir / LOCK_FILE
        self.command = command or " ".join(["batch", *sys.argv[1:]])
        self._fd: int | None = None
        self._made_dir = False

    def acquire(self) -> None:
        self._made_dir = not self.dir.exists()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{self.dir}: cannot create the output directory or its lock file: "
                              f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            os.close(fd)
            raise OutputError(in_use(self.dir, who)) from None
        self._fd = fd
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, orjson.dumps(me), 0)

    def release(self, *, remove_empty_dir: bool = False) -> None:
        """Let go of the lock (safe to call twice). With ``remove_empty_dir``, a directory this lock
        created and nothing else wrote into is removed again (a run refused before it wrote anything)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if remove_empty_dir and self._made_dir and [p.name for p in self.dir.iterdir()] == [LOCK_FILE]:
            self.path.unlink(missing_ok=True)
            self.dir.rmdir()
        os.close(fd)  # closing drops the flock; the file stays, so no other process locks a stale inode

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release(remove_empty_dir=exc is not None)


def holder(out_dir: Path) -> str | None:
    """Who holds ``out_dir``'s lock now, or None; for ``batch validate``. It creates nothing: no lock file, no
    directory. It takes the lock shared for an instant, so a run starting in that instant is refused."""
    try:
        fd = os.open(out_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: no run has ever held it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def in_use(out_dir: Path, holder: str, done: str = "nothing was read or sent") -> str:
    """The refusal when another process holds ``out_dir``; ``done`` says what this command did."""
    return (f"{out_dir} is in use by another batch process ({holder}); {done}. Wait for it to finish, stop it, "
            "or give this run another output.path (--output DIR)")


def _holder(fd: int) -> str:
    """Who holds the lock; a holder that has only just taken it gets 0.2 s to write its name."""
    for _ in range(20):
        if raw := os.pread(fd, 4096, 0):
            return _describe(raw)
        time.sleep(0.01)
    return _describe(b"")


def _describe(raw: bytes) -> str:
    """Who holds a lock, from what it wrote; it may not have written yet."""
    try:
        info = orjson.loads(raw)
        return (f"pid {info['pid']} on {info['host']}, `{info['command']}`, started {info['started']}")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "a process that has just started"
