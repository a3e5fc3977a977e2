"""Progress: a tqdm bar on a terminal, plain periodic lines otherwise, or nothing.

Workers only bump integers in ``Tally``; the display reads them a few times a
second from the monitor task, so progress never costs anything per request.

Every frame has two scopes, said as such: the *dataset* (input rows that have
a result in the output, of all input rows: a resumed run starts where the
last one ended, not at 0) and *this run* (rows finished, ok, error, cost
billed, rate). The last frame is made from the run's summary
(``Summary.frame``), so the screen ends on the summary's own figures.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Never, TextIO

from tqdm import tqdm

LOG_EVERY_SECONDS = 10.0
LOG_EVERY_ENV = "BATCH_PROGRESS_SECONDS"  # seconds between plain progress lines (stderr not a terminal)
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} rows [{elapsed}<{remaining}{postfix}]"


@dataclass(slots=True)
class Tally:
    """Counts that workers increment; read by the display and the summary."""

    done: int = 0  # rows finished this run, ok or error
    new: int = 0  # of them, rows that had no result before (a redone row replaces its old one)
    ok: int = 0
    errors: int = 0
    cost_usd: float = 0.0  # billed this run so far, answered or not (the monitor sums the models' stats)

    def count(self, ok: bool, replaces: int) -> None:
        """One row finished, by either lane; ``replaces`` >= 0: it replaces an older result of the same id."""
        self.done += 1
        if replaces < 0:  # a redone row replaces its old result: the dataset has no more rows for it
            self.new += 1
        if ok:
            self.ok += 1
        else:
            self.errors += 1


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and its noun: "1 row", "2 rows"; ``many`` for an irregular plural ("batches")."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def money(usd: float) -> str:
    """Dollars as the progress display and the summary both show them, so the two can be compared."""
    return f"${usd:.6f}"


@dataclass(frozen=True, slots=True)
class Frame:
    """What one progress frame shows."""

    rows: int  # input rows with a result in the output (the dataset)
    total: int | None  # input rows that should get one
    run_rows: int  # rows finished this run
    run_ok: int
    run_errors: int
    cost_usd: float  # billed this run
    seconds: float  # this run so far

    @property
    def rate(self) -> float:
        return self.run_rows / self.seconds if self.seconds > 0 else 0.0

    def dataset(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        pct = f" ({100 * self.rows / self.total:.1f}%)" if self.total else ""
        noun = "row" if (self.total if self.total is not None else self.rows) == 1 else "rows"  # "0/1 row"
        return f"{self.rows}{of} {noun}{pct}"

    def this_run(self) -> str:
        return (f"this run: {plural(self.run_rows, 'row')}, ok={self.run_ok} err={self.run_errors}, "
                f"{money(self.cost_usd)}, {self.rate:.1f} rows/s")


def _log_every() -> float:
    try:
        return max(0.0, float(os.environ.get(LOG_EVERY_ENV, LOG_EVERY_SECONDS)))
    except ValueError:
        return LOG_EVERY_SECONDS


class Progress:
    """``total``: input rows that should get a result; ``done_before``: rows that had one when the run began."""

    def __init__(self, total: int | None, *, quiet: bool, stream: TextIO | None = None, done_before: int = 0) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.quiet = quiet
        self.done_before = done_before
        self.started = time.monotonic()
        self.every = _log_every()
        self._last_log = self.started
        self._bar: tqdm[Never] | None = None
        if not quiet and self.stream.isatty():
            # tqdm's own rate is left out: the postfix says this run's, as the summary computes it
            self._bar = tqdm(total=total, initial=done_before, unit="row", file=self.stream, dynamic_ncols=True,
                             smoothing=0.1, bar_format=BAR_FORMAT)

    def frame(self, tally: Tally) -> Frame:
        return Frame(rows=self.done_before + tally.new, total=self.total, run_rows=tally.done, run_ok=tally.ok,
                     run_errors=tally.errors, cost_usd=tally.cost_usd, seconds=time.monotonic() - self.started)

    def update(self, tally: Tally, held_back: str = "") -> None:
        if self.quiet:
            return
        extra = f" | {held_back}" if held_back else ""
        if self._bar is not None:
            self._draw(self.frame(tally), extra)
            return
        now = time.monotonic()
        if now - self._last_log >= self.every:
            self._last_log = now
            self.log_line(self.frame(tally), extra)

    def _draw(self, frame: Frame, extra: str = "") -> None:
        assert self._bar is not None
        self._bar.n = frame.rows
        self._bar.set_postfix_str(frame.this_run() + extra, refresh=False)
        self._bar.refresh()

    def log_line(self, frame: Frame, extra: str = "") -> None:
        print(f"[batch] {frame.dataset()} | {frame.this_run()}{extra}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line that must be seen even in quiet mode (warnings, stop reasons)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self, final: Frame | None) -> None:
        """End on ``final``, the summary's figures (``Summary.frame``); None: the run ended without one."""
        if self._bar is not None:
            if final is not None:
                self._draw(final)
            self._bar.close()
        elif not self.quiet and final is not None and final.run_rows:
            self.log_line(final)
