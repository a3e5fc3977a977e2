"""Planning the lanes against a deadline: pure arithmetic, on any clock.

The batch lane is about half the price and takes minutes to hours; the online
lane runs at the model's rate limit. The plan:

- **At the start**, every row still to do goes to provider batches, if there
  is time: a batch that cannot be cancelled (OpenRouter) is not submitted
  later than ``batch_expected_seconds`` before the deadline, since pulling its
  rows back online would pay for them twice; one that can (OpenAI) is worth
  submitting while the online lane could still do its rows in time.
- **At every poll**, the rows batches still owe are compared with what the
  online lane can answer before the deadline (its pace times the time left,
  with a safety share, less its own backlog). Once they would not fit, the
  newest batches are pulled back, just enough of them: OpenAI batches are
  cancelled; OpenRouter's cannot be, so their rows go online and a late
  answer from the batch is a second answer (billed, recorded in stats, never
  a second row).
- Lines that failed or expired go to another batch while there is time for
  one, else online.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

SAFETY = 0.8  # plan the online lane at this share of its pace: latency, retries and jitter take the rest
MARGIN_SECONDS = 10.0  # and finish this long before the deadline...
MARGIN_SHARE = 0.05  # ...or this share of the time the run had, if less: a 60 s deadline cannot spare 10 s
_DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$")
_CLOCK_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*$")


def parse_deadline(text: str, now: float) -> float:
    """A unix time from ``"07:00"`` or ``"07:00:30"`` (the next such local time), an ISO time, or a duration
    (``8h``, ``90m``, ``1h30m``, ``45s``; not 0) from ``now``. ValueError says what forms are accepted. An ISO
    time may be in the past: the job check (batch/job.py) refuses that, naming the time."""
    if (m := _CLOCK_RE.match(text)) is not None:
        hour, minute, second = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        if hour > 23 or minute > 59 or second > 59:
            raise ValueError(f"{text!r} is not a time of day")
        start = datetime.fromtimestamp(now)
        at = start.replace(hour=hour, minute=minute, second=second, microsecond=0)
        return (at if at.timestamp() > now else at + timedelta(days=1)).timestamp()
    if (m := _DURATION_RE.match(text)) is not None and any(m.groups()):
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        if h * 3600 + mi * 60 + s <= 0:
            raise ValueError(f"{text!r} is a duration of 0: the deadline would be now; give the time the run "
                             "may take, e.g. \"8h\" or \"90m\"")
        return now + h * 3600 + mi * 60 + s
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"cannot read {text!r}: write a time of day (\"07:00\"), an ISO time "
                         "(\"2026-12-03T07:00:00+01:00\") or a duration (\"8h\", \"90m\", \"1h30m\")") from None


def margin_for(deadline: float, start: float) -> float:
    """How long before the deadline the plan means to be done: ``MARGIN_SECONDS``, less for a short run."""
    return min(MARGIN_SECONDS, MARGIN_SHARE * max(0.0, deadline - start))


@dataclass(frozen=True, slots=True)
class Outstanding:
    """A batch still running: how many of its rows it has not answered yet, and whether it can be cancelled."""

    key: str
    rows_owed: int
    cancellable: bool
    submitted_at: float


def online_capacity(now: float, deadline: float, rows_per_second: float, backlog: int,
                    margin: float = MARGIN_SECONDS) -> float:
    """Rows the online lane can still answer before the deadline, after its own backlog."""
    return max(0.0, rows_per_second * SAFETY * (deadline - now - margin)) - backlog


def may_submit(now: float, deadline: float, *, cancellable: bool, expected_seconds: float, rows: int,
               rows_per_second: float, margin: float = MARGIN_SECONDS) -> bool:
    """Is a new batch worth it? One that cannot be cancelled needs the usual batch time before the
    deadline; one that can needs only that the online lane could still do its rows if pulled back."""
    left = deadline - now - margin
    if not cancellable:
        return left >= expected_seconds
    return left > 0 and online_capacity(now, deadline, rows_per_second, 0, margin) >= rows * 0.25


def to_pull_back(now: float, deadline: float, rows_per_second: float, backlog: int,
                 batches: Sequence[Outstanding], margin: float = MARGIN_SECONDS, lookahead: float = 0.0) -> list[str]:
    """The batches whose rows must go online now (newest first), just enough that the rest fits. ``lookahead``:
    seconds to the next chance to pull back (the poll interval); the rest must still fit then."""
    capacity = online_capacity(now + lookahead, deadline, rows_per_second, backlog, margin)
    owed = sum(b.rows_owed for b in batches)
    pulled = []
    for b in sorted(batches, key=lambda b: (b.cancellable is False, -b.submitted_at)):
        if owed <= capacity:
            break
        pulled.append(b.key)
        owed -= b.rows_owed
        capacity -= b.rows_owed  # its rows now take online time too
    return pulled


def now() -> float:
    return time.time()
