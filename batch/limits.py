"""Stage 4: per-model request and token budgets that run at the limit, not into it.

``ModelLimiter.acquire(tokens)`` waits until one more request of that many
(estimated) tokens fits both budgets, and until any pause ordered by a 429
has passed. After the reply, ``settle`` swaps the estimate for the tokens the
provider reported, so the token budget tracks what the provider counts.

Bucket sizing: a leaky bucket of capacity C draining r per second admits up
to C + 60·r in a sliding minute. aiolimiter's natural setting (C = limit over
60 s) admits almost *twice* the limit in one window. Here C is half a second
of the rate and r = (limit·(1 - margin) - C) / 60, so no 60-second window can
exceed the limit (``SAFETY_MARGIN`` absorbs network jitter between our clock
and the provider's). After the rate is lowered the capacity stays as it was,
so the bound holds while C stays under half the new limit: for any cut
smaller than 60x.

Steering, per model:
- headers (``x-ratelimit-limit|remaining|reset-*``, read on every response):
  a stated limit below ours becomes ours; nothing remaining pauses the model
  until the stated reset;
- a 429 pauses the whole model for the advised time; a limit stated in it
  (headers or message) is adopted; otherwise, once per episode, the rate
  drops to what the provider actually *admitted* over the last 60 s, in
  requests and in tokens (under a sliding-window limit that is the limit
  itself), but never below half the current rate (multiplicative decrease:
  early in a run little has been admitted yet). The lowered rate is
  remembered as the limit found; after a calm spell the rate climbs back to
  it by 2% a step every 2 s, then probes beyond it by only 0.5% every 20 s
  (so a job limit far above the real one does not mean repeated 429 storms).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiolimiter import AsyncLimiter

BURST_SECONDS = 0.5
SAFETY_MARGIN = 0.005
ADMITTED_MARGIN = 0.97  # of what the provider admitted in the last minute, after a 429
FLOOR = 0.5  # a 429 never cuts the rate below half of what it was
INCREASE_STEP = 0.02  # of the ceiling
INCREASE_EVERY = 2.0  # seconds without a 429 between steps
CALM_AFTER_429 = 6.0  # seconds before increases resume
PROBE_STEP = 0.005  # of the limit found, beyond it
PROBE_EVERY = 20.0
EPISODE_SECONDS = 2.0  # 429s closer together than this are one episode: one decrease


def _sizing(per_minute: float, min_capacity: float) -> tuple[float, float]:
    """(capacity, time_period) for AsyncLimiter such that no 60 s window admits more than per_minute."""
    usable = per_minute * (1 - SAFETY_MARGIN)
    capacity = min(max(min_capacity, per_minute / 60.0 * BURST_SECONDS), usable / 2)
    return capacity, _period(usable, capacity)


def _period(usable: float, capacity: float) -> float:
    rate = max(usable - capacity, usable / 2)  # per 60 s, after the first burst of `capacity`
    return capacity * 60.0 / rate


class SteerableLimiter(AsyncLimiter):
    """aiolimiter's leaky bucket, plus a rate that can change and amounts that can be reconciled.

    The capacity is fixed when the bucket is made; ``set_rate`` changes only
    the drain rate. (Shrinking the capacity under a waiting acquire of a
    larger amount would leave it waiting forever.) ``take`` goes through a
    FIFO lock, so a large prompt is not starved by small ones (aiolimiter
    alone serves smaller waiting amounts first).

    The additions touch aiolimiter's bucket level (``_level``, ``_leak``,
    ``_wake_next``, ``_rate_per_sec``); pyproject pins aiolimiter below 2.
    """

    def __init__(self, per_minute: float, *, min_capacity: float = 1.0) -> None:
        self.per_minute = per_minute
        capacity, period = _sizing(per_minute, min_capacity)
        super().__init__(capacity, period)
        self._fifo = asyncio.Lock()  # aiolimiter serves smaller waiting amounts first: big prompts could starve

    def set_rate(self, per_minute: float) -> None:
        self._leak()
        self.per_minute = per_minute
        self.time_period = _period(per_minute * (1 - SAFETY_MARGIN), self.max_rate)
        self._rate_per_sec = self.max_rate / self.time_period
        self._wake_next()

    async def take(self, amount: float) -> None:
        """Acquire ``amount`` in arrival order; an amount larger than the bucket takes the whole
        bucket and owes the rest, which the next requests wait for."""
        async with self._fifo:
            part = min(amount, self.max_rate)
            await self.acquire(part)
            if amount > part:
                self.adjust(amount - part)

    def adjust(self, delta: float) -> None:
        """Add (or, negative, give back) capacity already used, e.g. estimate -> reported usage."""
        self._leak()
        self._level = max(0.0, self._level + delta)
        self._wake_next()


class ModelLimiter:
    """Budgets for one model; a no-op fast path until a limit is configured or discovered."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.ceiling_rpm: float | None = requests_per_minute
        self.ceiling_tpm: float | None = tokens_per_minute
        self.requests = SteerableLimiter(requests_per_minute) if requests_per_minute else None
        self.tokens = SteerableLimiter(tokens_per_minute) if tokens_per_minute else None
        self.paused_until = 0.0
        self.waiting = 0  # requests held back right now; shown by the progress line
        self.limited = self.requests is not None or self.tokens is not None
        self._last_429 = -1e9
        self._last_step = 0.0
        self._found: dict[str, float] = {}  # the rate the last 429 episode settled on, per budget
        self._ring: list[list[int]] = []  # [second, sent, answered ok, tokens of those]; <= 61 entries

    async def acquire(self, tokens: int) -> None:
        if not self.limited:
            return
        self.waiting += 1
        try:
            while (delay := self.paused_until - self.clock()) > 0:
                await asyncio.sleep(delay)
            if self.requests is not None:
                await self.requests.take(1)
            if self.tokens is not None:
                await self.tokens.take(tokens)
        finally:
            self.waiting -= 1

    @property
    def paused(self) -> bool:
        return self.paused_until > self.clock()

    def pause(self, seconds: float) -> None:
        """Hold every request of this model for ``seconds``."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)
        self.limited = True

    def settle(self, reserved: int, used: int) -> None:
        """Replace a request's estimated tokens with what the provider reported."""
        if self.tokens is not None and used > 0:
            self.tokens.adjust(used - reserved)
        self._maybe_increase()

    def refund(self, reserved: int) -> None:
        """A 429'd request was not counted by the provider: give its budget back."""
        if self.requests is not None:
            self.requests.adjust(-1)
        if self.tokens is not None:
            self.tokens.adjust(-reserved)

    def sent(self) -> None:
        """Note one request sent now."""
        self._slot()[1] += 1

    def admitted(self, tokens: int) -> None:
        """Note one request the provider answered (what a 429 is later measured against)."""
        slot = self._slot()
        slot[2] += 1
        slot[3] += tokens

    def _slot(self) -> list[int]:
        second = int(self.clock())
        ring = self._ring
        if ring and ring[-1][0] == second:
            return ring[-1]
        ring.append([second, 0, 0, 0])
        if len(ring) > 61:
            del ring[0]
        return ring[-1]

    def last_minute(self) -> tuple[float, int, int]:
        """(requests sent per minute, scaled up while the run is younger; requests and tokens
        the provider answered in the last 60 s)."""
        now = int(self.clock())
        recent = [e for e in self._ring if e[0] > now - 60]
        if not recent:
            return 0.0, 0, 0
        span = min(60, now - recent[0][0] + 1)
        return (sum(e[1] for e in recent) * 60.0 / span, sum(e[2] for e in recent), sum(e[3] for e in recent))

    def observe(self, limit_requests: float | None, limit_tokens: float | None,
                remaining_requests: float | None, remaining_tokens: float | None,
                reset_requests: float | None, reset_tokens: float | None) -> None:
        """Steer by what x-ratelimit-* headers said about the provider's real limits."""
        if limit_requests:
            self._adopt("requests", limit_requests)
        if limit_tokens:
            self._adopt("tokens", limit_tokens)
        if remaining_requests is not None and remaining_requests <= 0 and reset_requests:
            self.pause(reset_requests)
        if remaining_tokens is not None and remaining_tokens <= 0 and reset_tokens:
            self.pause(reset_tokens)

    def on_rate_limited(self, wait: float, scope: str | None,
                        limit_requests: float | None, limit_tokens: float | None) -> None:
        """A 429: pause everyone, adopt a stated limit, else decrease once per episode."""
        now = self.clock()
        self.pause(wait)
        new_episode = now - self._last_429 > max(EPISODE_SECONDS, wait)
        self._last_429 = now
        if limit_requests or limit_tokens:
            if limit_requests:
                self._adopt("requests", limit_requests)
            if limit_tokens:
                self._adopt("tokens", limit_tokens)
            return
        if not new_episode:
            return
        sent_rpm, requests, tokens = self.last_minute()
        if scope in (None, "requests"):
            current = self.requests.per_minute if self.requests is not None else sent_rpm
            self._lower("requests", requests * ADMITTED_MARGIN, current * FLOOR)
        if scope == "tokens" or (scope is None and self.tokens is not None):
            current = self.tokens.per_minute if self.tokens is not None else float(tokens)
            self._lower("tokens", tokens * ADMITTED_MARGIN, current * FLOOR)

    # --- internals ----------------------------------------------------------------

    def _adopt(self, which: str, limit: float) -> None:
        """A limit the provider stated is the new ceiling, and the rate if ours is higher."""
        if which == "requests":
            if self.ceiling_rpm is None or limit < self.ceiling_rpm:
                self.ceiling_rpm = limit
            if self.requests is None or self.requests.per_minute > limit:
                self._set("requests", limit)
        else:
            if self.ceiling_tpm is None or limit < self.ceiling_tpm:
                self.ceiling_tpm = limit
            if self.tokens is None or self.tokens.per_minute > limit:
                self._set("tokens", limit)

    def _lower(self, which: str, admitted: float, floor: float) -> None:
        """Lower a budget to what was admitted (remembered as the limit found), or to the floor."""
        per_minute = max(1.0, admitted, floor)
        bucket = self.requests if which == "requests" else self.tokens
        if bucket is None or per_minute < bucket.per_minute:
            self._set(which, per_minute)
        if admitted >= floor:  # a measurement of the limit, not just a cautious halving
            self._found[which] = per_minute
        else:
            self._found.pop(which, None)

    def _set(self, which: str, per_minute: float) -> None:
        if which == "requests":
            if self.requests is None:
                self.requests = SteerableLimiter(per_minute)
            else:
                self.requests.set_rate(per_minute)
        else:
            if self.tokens is None:
                self.tokens = SteerableLimiter(per_minute)
            else:
                self.tokens.set_rate(per_minute)
        self.limited = True

    def _maybe_increase(self) -> None:
        """Additive increase: back to the limit found quickly, beyond it slowly."""
        now = self.clock()
        if now - self._last_429 < CALM_AFTER_429 or now - self._last_step < INCREASE_EVERY:
            return
        self._last_step = now
        for which, bucket, ceiling in (("requests", self.requests, self.ceiling_rpm),
                                       ("tokens", self.tokens, self.ceiling_tpm)):
            if bucket is None:
                continue
            top = ceiling if ceiling is not None else bucket.per_minute * 1.5
            found = self._found.get(which)
            if found is None or bucket.per_minute < found:
                step = INCREASE_STEP * (found if found is not None else top)
                new = bucket.per_minute + step if found is None else min(found, bucket.per_minute + step)
            elif now - self._last_429 >= PROBE_EVERY and (now - self._last_429) % PROBE_EVERY < INCREASE_EVERY:
                new = bucket.per_minute + PROBE_STEP * found
            else:
                continue
            if new > bucket.per_minute and bucket.per_minute < top:
                bucket.set_rate(min(top, new))
