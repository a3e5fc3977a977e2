"""A circuit breaker per model: skip a model that keeps failing, then probe it once.

::

    closed --(threshold consecutive failures)--> open --(cool-down)--> half-open
    half-open: exactly one probe goes through; its success closes, its failure reopens.

The router asks ``allow()`` before every attempt: ``GO`` (closed), ``PROBE``
(this attempt is the one probe) or ``NO``. It reports the outcome with
``success``, ``failure`` or ``release`` (an outcome that says nothing about
the model's health, such as a 429), passing ``probe=True`` for the probe:
only the probe's own outcome ends the half-open state, so requests that were
already in flight when the breaker opened cannot let a second probe through.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from batch.errors import ProviderError

NO, GO, PROBE = 0, 1, 2


class Breaker:
    """Consecutive-failure circuit breaker with a single half-open probe."""

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0
        self.open_until = 0.0
        self.probing = False
        self.opened = 0  # how many times it opened; for stats and tests
        self.last_error = ""

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def allow(self) -> int:
        """May a request go to this model now? PROBE claims the one half-open probe."""
        if self.failures < self.threshold:
            return GO
        if self.probing or self.clock() < self.open_until:
            return NO
        self.probing = True
        return PROBE

    def success(self, probe: bool = False) -> None:
        self.failures = 0
        if probe:
            self.probing = False

    def failure(self, error: ProviderError | None = None, probe: bool = False) -> None:
        if error is not None:
            self.last_error = str(error)
        self.failures += 1
        if probe or self.failures == self.threshold:
            self.open_until = self.clock() + self.cooldown
            if self.failures >= self.threshold:
                self.opened += 1
        if probe:
            self.probing = False

    def release(self, probe: bool = False) -> None:
        """An attempt ended without a verdict (e.g. rate limited); a probe's lets another probe go."""
        if probe:
            self.probing = False

    def seconds_to_probe(self) -> float:
        return max(0.05, self.open_until - self.clock())
