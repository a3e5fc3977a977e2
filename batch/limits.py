"""Stage 4: per-model request and token budgets, and a model-wide pause.

``ModelLimiter.acquire(tokens)`` waits until one more request of that many
tokens fits both budgets, and until any pause ordered by a 429 has passed.

Bucket sizing: a leaky bucket of capacity C draining at r per second lets
C + 60·r through in a sliding minute. A bucket holding a whole minute
(C = limit, r = limit/60) therefore admits almost *twice* the limit in one
window. Here C is small (``BURST_SECONDS`` of the rate) and r is lowered to
(limit - C)/60, so no 60-second window can exceed the limit.
"""

from __future__ import annotations

import asyncio
import time

from aiolimiter import AsyncLimiter

BURST_SECONDS = 0.5


def sized_limiter(per_minute: float, *, min_capacity: float = 1.0) -> AsyncLimiter:
    """A limiter that never admits more than ``per_minute`` in any 60-second window."""
    capacity = max(min_capacity, per_minute / 60.0 * BURST_SECONDS)
    capacity = min(capacity, per_minute / 2)  # keep at least half the minute for steady flow
    rate = per_minute - capacity  # per 60 s, after the initial burst of `capacity`
    return AsyncLimiter(capacity, time_period=capacity * 60.0 / rate)


class ModelLimiter:
    """Budgets for one model; no-op fast path when the job sets no limits."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self._requests = sized_limiter(requests_per_minute) if requests_per_minute else None
        self._tokens = sized_limiter(tokens_per_minute, min_capacity=1.0) if tokens_per_minute else None
        self._paused_until = 0.0
        self.waiting = 0  # requests currently held back; shown by the progress line

    @property
    def limited(self) -> bool:
        return self._requests is not None or self._tokens is not None or self._paused_until > 0

    async def acquire(self, tokens: int) -> None:
        if not self.limited:
            return
        self.waiting += 1
        try:
            while (delay := self._paused_until - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            if self._requests is not None:
                await self._requests.acquire()
            if self._tokens is not None:
                # A request larger than the bucket takes the whole bucket; the
                # bucket is sized so that this overshoot stays within one request.
                await self._tokens.acquire(min(float(tokens), self._tokens.max_rate))
        finally:
            self.waiting -= 1

    def pause(self, seconds: float) -> None:
        """Hold every request of this model for ``seconds`` (after a 429)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    @property
    def paused(self) -> bool:
        return self._paused_until > time.monotonic()
