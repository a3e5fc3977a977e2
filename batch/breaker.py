"""A circuit breaker per model: skip a model that keeps failing, then probe it once.

::

    closed --(threshold consecutive failures)--> open --(cool-down)--> half-open
    half-open: exactly one probe goes through; success closes, failure reopens.

The router asks ``allow()`` before every attempt and reports the outcome with
``success()``, ``failure()`` or ``release()`` (an outcome that says nothing
about the model's health, such as a 429).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from batch.errors import ProviderError


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

    def allow(self) -> bool:
        """May a request go to this model now? Claims the probe when half-open."""
        if self.failures < self.threshold:
            return True
        if self.probing or self.clock() < self.open_until:
            return False
        self.probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self.probing = False

    def failure(self, error: ProviderError | None = None) -> None:
        if error is not None:
            self.last_error = str(error)
        self.failures += 1
        if self.failures >= self.threshold and (self.probing or self.failures == self.threshold):
            self.open_until = self.clock() + self.cooldown
            self.opened += 1
        self.probing = False

    def release(self) -> None:
        """A probe ended without a verdict (e.g. rate limited): let another probe."""
        self.probing = False

    def seconds_to_probe(self) -> float:
        return max(0.05, self.open_until - self.clock())
