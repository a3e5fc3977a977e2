"""What a run was billed, written down as it happens, so that money is never forgotten.

A run appends one line per billed reply to ``OUT/.spend-RUN_ID.jsonl`` with
an unbuffered ``os.write``: the kernel keeps what was written even if the
process is killed with -9 a microsecond later (a power cut may lose the last
lines). A run that ends normally writes its figures to stats.parquet and
deletes its journal. At the next start, the journal of a run that did not end
(killed, crashed) becomes that run's rows in stats.parquet: so the cost cap
(``max_cost_usd``) and ``batch stats`` count every billed request, including
the answers that were paid for but never reached a part file.

Line format: ``["provider:model", cost_usd, prompt_tokens, completion_tokens]``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

from batch.stats import COUNTERS, Usage

JOURNAL_PREFIX = ".spend-"
JOURNAL_SUFFIX = ".jsonl"


class SpendJournal:
    """Appends billed amounts of one run; ``close()`` is safe to call twice."""

    def __init__(self, out_dir: Path, run_id: str) -> None:
        self.path = out_dir / f"{JOURNAL_PREFIX}{run_id}{JOURNAL_SUFFIX}"
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.error: str | None = None

    def add(self, label: str, cost: float, prompt_tokens: int, completion_tokens: int) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, orjson.dumps([label, cost, prompt_tokens, completion_tokens]) + b"\n")
        except OSError as exc:  # a full disk: the run goes on (and will stop on its next part write)
            self.error = f"{self.path}: cannot record spend ({exc.strerror or exc})"
            os.close(self._fd)
            self._fd = None

    def close(self, *, delete: bool) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if delete:
            self.path.unlink(missing_ok=True)


def orphan_journals(out_dir: Path) -> dict[str, Path]:
    """run_id -> journal of runs that did not end normally (call while holding the output's lock)."""
    return {p.name[len(JOURNAL_PREFIX):-len(JOURNAL_SUFFIX)]: p
            for p in out_dir.glob(f"{JOURNAL_PREFIX}*{JOURNAL_SUFFIX}")}


def journal_usage(path: Path) -> dict[tuple[str, str], Usage]:
    """(provider, model) -> what the journal says was billed: requests, tokens and cost."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0, 0])
    for line in path.read_bytes().splitlines():
        try:
            label, cost, prompt, completion = orjson.loads(line)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            continue  # a line cut by a power cut: what it held is lost, the rest counts
        s = sums[str(label)]
        s[0] += 1
        s[1] += float(cost)
        s[2] += int(prompt)
        s[3] += int(completion)
    usage: dict[tuple[str, str], Usage] = {}
    for label, (n, cost, prompt, completion) in sums.items():
        provider, _, model = label.partition(":")
        counts: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
        counts.update(requests=int(n), cost_usd=cost, prompt_tokens=int(prompt), completion_tokens=int(completion))
        usage[(provider, model)] = Usage(**counts)
    return usage
