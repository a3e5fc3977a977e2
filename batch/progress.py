"""Progress: a tqdm bar on a terminal, plain periodic lines otherwise, or nothing.

Workers only bump integers in ``Tally``; the display reads them a few times a
second from the monitor task, so progress never costs anything per request.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Never, TextIO

from tqdm import tqdm

LOG_EVERY_SECONDS = 10.0


@dataclass(slots=True)
class Tally:
    """Counts that workers increment; read by the display and the summary."""

    done: int = 0
    ok: int = 0
    errors: int = 0
    cost_usd: float = 0.0


class Progress:
    def __init__(self, total: int | None, *, quiet: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.quiet = quiet
        self.started = time.monotonic()
        self._last_log = self.started
        self._bar: tqdm[Never] | None = None
        if not quiet and self.stream.isatty():
            self._bar = tqdm(total=total, unit="row", file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def update(self, tally: Tally, held_back: str = "") -> None:
        if self.quiet:
            return
        extra = f" | {held_back}" if held_back else ""
        if self._bar is not None:
            self._bar.n = tally.done
            self._bar.set_postfix_str(f"ok={tally.ok} err={tally.errors} ${tally.cost_usd:.4f}{extra}", refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_SECONDS:
            self._last_log = now
            self.log_line(tally, extra)

    def log_line(self, tally: Tally, extra: str = "") -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        pct = f" ({100 * tally.done / self.total:.1f}%)" if self.total else ""
        print(f"[batch] {tally.done}{of} rows{pct} ok={tally.ok} err={tally.errors} "
              f"cost=${tally.cost_usd:.4f} {tally.done / elapsed:.1f} rows/s{extra}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line that must be seen even in quiet mode (warnings, stop reasons)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self, tally: Tally) -> None:
        if self._bar is not None:
            self._bar.n = tally.done
            self._bar.refresh()
            self._bar.close()
        elif not self.quiet and tally.done:
            self.log_line(tally)
