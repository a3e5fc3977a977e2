"""Stage 4: per-model request and token budgets that run at the limit, not into it.

``Pace`` is one budget (requests or tokens per minute). It spaces requests by
GCRA (the generic cell rate algorithm): a request may go once the debt of the
ones before it has drained at the pace's rate, and then adds its own amount
as debt. There is no burst, so a provider that enforces a per-minute limit
over shorter windows too (OpenAI: "60,000 requests per minute may be enforced
as 1,000 per second") sees the rate, never a spike; after a pause the first
request goes and the next waits its turn, so a pause is never followed by a
burst. On top, an exact log of the last 60 seconds is a hard cap: no sliding
minute ever holds more than the limit, even for requests larger than a
second's worth of tokens. ``SAFETY_MARGIN`` keeps the pace just under the
limit, for the jitter between our clock and the provider's.

``Gate`` holds both budgets of one model and the queue of requests waiting
for them, in arrival order: a request takes its request *and* its tokens in
one step, when both allow, so a large prompt waiting for tokens holds back
the requests behind it instead of letting them pass and burst later. A pause
(ordered by a 429) holds every waiter. ``Gate`` is pure (any clock, no
asyncio): the tests drive it on a virtual clock, and the Ray engine's
cluster-wide limiter wraps the same object.

``ModelLimiter`` is the asyncio face of a Gate for one process; steering by
what providers say (headers, 429s) is in batch/steer.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

SAFETY_MARGIN = 0.005
WINDOW = 60.0  # the window a per-minute limit is counted over
EDGE = 0.01  # seconds: an admission leaves our 60 s log this much after it leaves the provider's
EPSILON = 1e-6  # seconds: a wait shorter than this is no wait (float rounding of the debt)


class Pace:
    """One budget: ``per_minute`` units, spaced evenly, never more than that in any 60 s."""

    __slots__ = ("per_minute", "cap", "rate", "debt", "stamp", "log", "total", "horizon")

    def __init__(self, per_minute: float, now: float = 0.0) -> None:
        self.set_rate(per_minute)
        self.debt = 0.0  # units not yet drained at ``stamp``
        self.stamp = now
        self.log: deque[list[float]] = deque()  # [time, amount] of the last 60 s
        self.total = 0.0
        self.horizon = -WINDOW  # entries older than this are out of the log

    def set_rate(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self.cap = per_minute  # the hard cap: EDGE covers the skew between our clock and the provider's
        self.rate = per_minute * (1 - SAFETY_MARGIN) / WINDOW  # units per second

    def wait(self, now: float, amount: float) -> float:
        """Seconds until ``amount`` may go: the debt before it drained, and room in the last 60 s."""
        spacing = self._debt(now) / self.rate
        return max(spacing, self._window_wait(now, amount))

    def take(self, now: float, amount: float) -> list[float]:
        """Admit ``amount`` now; returns its log entry (to settle it later)."""
        self.debt = self._debt(now) + amount
        self.stamp = now
        entry = [now, amount]
        self.log.append(entry)
        self.total += amount
        return entry

    def settle(self, now: float, entry: list[float], actual: float) -> None:
        """Replace an admitted estimate with what the provider counted (0: it counted nothing)."""
        delta = actual - entry[1]
        if entry[0] > self.horizon:  # still in the 60 s log
            entry[1] = actual
            self.total += delta
        self.debt = max(0.0, self._debt(now) + delta)
        self.stamp = now

    def _debt(self, now: float) -> float:
        return max(0.0, self.debt - self.rate * (now - self.stamp))

    def _window_wait(self, now: float, amount: float) -> float:
        self._expire(now)
        excess = self.total + amount - self.cap
        if excess <= 0 or not self.log:
            return 0.0  # an empty window takes even an amount over the cap (the provider decides)
        for t, a in self.log:
            excess -= a
            if excess <= 0:
                return t + WINDOW + EDGE - now
        return self.log[-1][0] + WINDOW + EDGE - now

    def _expire(self, now: float) -> None:
        self.horizon = now - WINDOW - EDGE
        log = self.log
        while log and log[0][0] <= self.horizon:
            self.total -= log.popleft()[1]


@dataclass(slots=True)
class Ticket:
    """What one admitted request took, so that it can be settled or refunded."""

    tokens: float
    request_entry: list[float] | None = None
    token_entry: list[float] | None = None
    too_large: bool = False  # more tokens than the whole limit: the provider would refuse it, so send nothing


@dataclass(slots=True)
class Waiter:
    tokens: float
    granted: Ticket | None = None
    cancelled: bool = False


@dataclass(slots=True)
class Gate:
    """Both budgets of one model, a pause, and the queue of waiting requests (first come, first served)."""

    requests: Pace | None = None
    tokens: Pace | None = None
    paused_until: float = 0.0
    queue: deque[Waiter] = field(default_factory=deque)

    @property
    def limited(self) -> bool:
        return self.requests is not None or self.tokens is not None or bool(self.paused_until)

    def wait(self, now: float, tokens: float) -> float:
        """Seconds until one request of ``tokens`` fits both budgets and the pause is over."""
        w = self.paused_until - now
        if self.requests is not None:
            w = max(w, self.requests.wait(now, 1.0))
        if self.tokens is not None:
            w = max(w, self.tokens.wait(now, tokens))
        return w if w > EPSILON else 0.0

    def take(self, now: float, tokens: float) -> Ticket:
        ticket = Ticket(tokens)
        if self.requests is not None:
            ticket.request_entry = self.requests.take(now, 1.0)
        if self.tokens is not None:
            ticket.token_entry = self.tokens.take(now, tokens)
        return ticket

    def grant(self, now: float) -> tuple[list[Waiter], float | None]:
        """Admit waiters from the head of the queue while they fit; returns them and the seconds until
        the next one may go (None: nobody waits)."""
        granted: list[Waiter] = []
        queue = self.queue
        while queue:
            head = queue[0]
            if head.cancelled:
                queue.popleft()
                continue
            if self.tokens is not None and head.tokens > self.tokens.cap:  # learnt while it waited
                queue.popleft()
                head.granted = Ticket(head.tokens, too_large=True)
                granted.append(head)
                continue
            wait = self.wait(now, head.tokens)
            if wait:
                return granted, wait
            queue.popleft()
            head.granted = self.take(now, head.tokens)
            granted.append(head)
        return granted, None

    def settle(self, now: float, ticket: Ticket, used_tokens: float) -> None:
        """The provider counted ``used_tokens`` for this request (and the request itself)."""
        if self.tokens is not None and ticket.token_entry is not None:
            self.tokens.settle(now, ticket.token_entry, used_tokens)

    def refund(self, now: float, ticket: Ticket) -> None:
        """The provider counted nothing (a 429): give back the request and its tokens."""
        if self.requests is not None and ticket.request_entry is not None:
            self.requests.settle(now, ticket.request_entry, 0.0)
        if self.tokens is not None and ticket.token_entry is not None:
            self.tokens.settle(now, ticket.token_entry, 0.0)

    def set_limit(self, which: str, per_minute: float, now: float) -> None:
        pace = self.requests if which == "requests" else self.tokens
        if pace is not None:
            pace.set_rate(per_minute)
        elif which == "requests":
            self.requests = Pace(per_minute, now)
        else:
            self.tokens = Pace(per_minute, now)

    def limit(self, which: str) -> float | None:
        pace = self.requests if which == "requests" else self.tokens
        return pace.per_minute if pace is not None else None


class ModelLimiter:
    """A Gate for one process: ``await acquire(tokens)`` returns a Ticket when both budgets allow.

    The unlimited case (no limit configured or discovered) costs no coroutine:
    callers check ``limited`` first. Steering (batch/steer.py) sets the gate's
    rates and pauses from what the provider says.
    """

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        now = clock()
        self.gate = Gate(Pace(requests_per_minute, now) if requests_per_minute else None,
                         Pace(tokens_per_minute, now) if tokens_per_minute else None)
        self._futures: dict[int, asyncio.Future[Ticket]] = {}
        self._timer: asyncio.TimerHandle | None = None

    @property
    def limited(self) -> bool:
        return self.gate.limited

    @property
    def waiting(self) -> int:
        """Requests held back right now (shown by the progress line)."""
        return len(self.gate.queue)

    @property
    def paused(self) -> bool:
        return self.gate.paused_until > self.clock()

    async def acquire(self, tokens: float) -> Ticket:
        waiter = Waiter(tokens)
        self.gate.queue.append(waiter)
        future: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        self._futures[id(waiter)] = future
        self._wake()
        try:
            return await future
        except asyncio.CancelledError:
            waiter.cancelled = True
            if waiter.granted is not None:  # granted in the same instant it was cancelled
                self.gate.refund(self.clock(), waiter.granted)
            self._wake()
            raise
        finally:
            self._futures.pop(id(waiter), None)

    def pause(self, seconds: float) -> None:
        """Hold every request of this model, those already waiting too, for ``seconds``."""
        self.gate.paused_until = max(self.gate.paused_until, self.clock() + seconds)
        self._wake()

    def settle(self, ticket: Ticket, used_tokens: float) -> None:
        self.gate.settle(self.clock(), ticket, used_tokens)
        self._wake()

    def refund(self, ticket: Ticket) -> None:
        self.gate.refund(self.clock(), ticket)
        self._wake()

    def set_limit(self, which: str, per_minute: float) -> None:
        self.gate.set_limit(which, per_minute, self.clock())
        self._wake()

    def _wake(self) -> None:
        """Grant whoever fits now, and set one timer for the head of the queue."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        granted, wait = self.gate.grant(self.clock())
        for waiter in granted:
            future = self._futures.get(id(waiter))
            if future is not None and not future.done():
                assert waiter.granted is not None
                future.set_result(waiter.granted)
        if wait is not None:
            self._timer = asyncio.get_running_loop().call_later(wait, self._wake)
