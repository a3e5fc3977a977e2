"""What a run was billed, written down as it happens, so that money is never forgotten.

A run records every billed reply in ``OUT/.spend-RUN_ID.bin`` through a
shared memory map: a record is a memory store (no system call on the hot
path), and the kernel keeps the mapped pages when the process dies, so a kill
-9 a microsecond later loses nothing (a power cut may lose the last pages).
Model labels go to ``OUT/.spend-RUN_ID.labels``, one line each, the first time
a model is billed. A run that ends normally writes its figures to
stats.parquet and deletes its journal. At the next start, the journal of a
run that did not end (killed, crashed) becomes that run's rows in
stats.parquet: so the cost cap (``max_cost_usd``) and ``batch stats`` count
every billed request, including answers paid for that never reached a part.

Record layout (``RECORD``, little-endian, 20 bytes): marker 1, unused byte,
label index, prompt tokens, completion tokens, cost in USD (float64). A zero
marker ends the records (the file is grown in zero-filled steps).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

from batch.stats import COUNTERS, Usage

JOURNAL_PREFIX = ".spend-"
RECORD = struct.Struct("<BxHIId")
GROW_BYTES = RECORD.size * 16_384  # ~320 KB a step: one remap per 16k billed replies


class SpendJournal:
    """Records billed amounts of one run; ``close()`` is safe to call twice."""

    def __init__(self, out_dir: Path, run_id: str) -> None:
        self.path = out_dir / f"{JOURNAL_PREFIX}{run_id}.bin"
        self.labels_path = out_dir / f"{JOURNAL_PREFIX}{run_id}.labels"
        self.error: str | None = None
        self._labels: dict[str, int] = {}
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._map: mmap.mmap | None = None
        self._size = 0
        self._offset = 0
        try:
            self._grow()
        except OSError as exc:
            self.error = f"{self.path}: cannot record spend ({exc.strerror or exc})"
            self._release()

    def add(self, label: str, cost: float, prompt_tokens: int, completion_tokens: int) -> None:
        if self._map is None:
            return
        index = self._labels.get(label)
        try:
            if index is None:
                index = self._new_label(label)
            if self._offset + RECORD.size > self._size:
                self._grow()
            RECORD.pack_into(self._map, self._offset, 1, index, min(prompt_tokens, 2**32 - 1),
                             min(completion_tokens, 2**32 - 1), cost)
            self._offset += RECORD.size
        except OSError as exc:  # a full disk: the run goes on (and will stop on its next part write)
            self.error = f"{self.path}: cannot record spend ({exc.strerror or exc})"
            self._release()

    def _new_label(self, label: str) -> int:
        index = len(self._labels)
        fd = os.open(self.labels_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, label.encode() + b"\n")
        finally:
            os.close(fd)
        self._labels[label] = index
        return index

    def _grow(self) -> None:
        assert self._fd is not None
        if self._map is not None:
            self._map.close()
        # Real blocks, zero-filled (a zero marker ends the records). ftruncate would make a sparse file,
        # and a store into a page the full disk cannot back kills the process with SIGBUS; allocating
        # first turns a full disk into an OSError here.
        os.posix_fallocate(self._fd, self._size, GROW_BYTES)
        self._size += GROW_BYTES
        self._map = mmap.mmap(self._fd, self._size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _release(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self, *, delete: bool) -> None:
        self._release()
        if delete:
            self.path.unlink(missing_ok=True)
            self.labels_path.unlink(missing_ok=True)


def orphan_journals(out_dir: Path) -> dict[str, Path]:
    """run_id -> journal of runs that did not end normally (call while holding the output's lock)."""
    return {p.name[len(JOURNAL_PREFIX):-len(".bin")]: p for p in out_dir.glob(f"{JOURNAL_PREFIX}*.bin")}


def remove_journal(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_suffix(".labels").unlink(missing_ok=True)


def journal_usage(path: Path) -> dict[tuple[str, str], Usage]:
    """(provider, model) -> what the journal says was billed: requests, tokens and cost."""
    labels_path = path.with_suffix(".labels")
    labels = labels_path.read_text().splitlines() if labels_path.exists() else []
    sums: dict[int, list[float]] = defaultdict(lambda: [0, 0.0, 0, 0])
    data = path.read_bytes()
    for offset in range(0, len(data) - RECORD.size + 1, RECORD.size):
        marker, index, prompt, completion, cost = RECORD.unpack_from(data, offset)
        if marker != 1:
            break
        s = sums[index]
        s[0] += 1
        s[1] += cost
        s[2] += prompt
        s[3] += completion
    usage: dict[tuple[str, str], Usage] = {}
    for index, (n, cost, prompt, completion) in sums.items():
        label = labels[index] if index < len(labels) else "unknown:unknown"  # a label lost to a power cut
        provider, _, model = label.partition(":")
        counts: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
        counts.update(requests=int(n), cost_usd=cost, prompt_tokens=int(prompt), completion_tokens=int(completion))
        usage[(provider, model)] = Usage(**counts)
    return usage
