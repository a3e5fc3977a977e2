"""The simulator's rate limits: sliding windows of any length, as providers enforce them.

A provider's "per minute" limit is often enforced over shorter windows too:
OpenAI's rate-limit guide says 60,000 requests per minute may be enforced as
1,000 per second, and gateways and proxies do the same. ``LimitGate`` keeps,
per budget, one exact sliding window of ``window_seconds`` (60 by default)
with the full limit, and for each length of ``limit_windows`` its pro-rata
share (a 1,200 rpm limit over 1 s windows is 20 per second): for requests an
exact sliding count, for tokens a bucket of that share draining at the
per-minute rate (a strict short token window would refuse every request
larger than its share, which the per-minute limit allows and providers only
refuse when it is larger than the whole limit). A request is admitted at
*arrival*, before any latency, as a gateway counts it, and only if every
window has room.

What a refusal says follows ``rate_limit_style``:
- ``openai``: 429 with ``Rate limit reached ... Limit N, Used U, Requested R.
  Please try again in 1.234s`` (N is the per-minute limit) and
  ``x-ratelimit-limit|remaining|reset-requests|tokens`` headers, no
  Retry-After; every answer carries the same headers. ``reset`` is the time
  until the limit *fully* resets, as OpenAI documents (WIRE.md 2.3): the time
  until the newest admission leaves the window, not until the next unit frees.
- ``openrouter``: no headers on success; 429s carry ``X-RateLimit-Limit``,
  ``X-RateLimit-Remaining``, ``X-RateLimit-Reset`` (ms epoch) and Retry-After.
- ``bare``: 429 with Retry-After only.

A single request larger than the whole token limit can never fit: OpenAI
answers it with 429 "Request too large", which no wait cures.

The gate records the highest amount admitted (and offered) in any window of
each length, so tests and benches read the real peak, not a timing.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web

from batch.sim_faults import error_response

BUDGETS = ("requests", "tokens")


class SlidingWindow:
    """Amounts admitted in the last ``length`` seconds, exactly (a deque of events)."""

    __slots__ = ("limit", "length", "events", "total", "peak")

    def __init__(self, limit: float, length: float) -> None:
        self.limit = limit
        self.length = length
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0
        self.peak = 0

    def expire(self, now: float) -> None:
        events = self.events
        while events and events[0][0] <= now - self.length:
            self.total -= events.popleft()[1]

    def wait_for(self, now: float, amount: int) -> float:
        """0 if ``amount`` fits now, else seconds until enough of the window has expired.

        An amount larger than the whole limit fits an empty window (callers
        refuse requests larger than the main limit before asking)."""
        self.expire(now)
        excess = self.total + amount - self.limit
        if excess <= 0 or not self.events:
            return 0.0
        for t, a in self.events:
            excess -= a
            if excess <= 0:
                return max(0.001, t + self.length - now)
        return max(0.001, self.events[-1][0] + self.length - now)  # only an empty window takes it

    def add(self, now: float, amount: int) -> None:
        self.events.append((now, amount))
        self.total += amount
        self.peak = max(self.peak, self.total)

    def full_reset_in(self, now: float) -> float:
        """Seconds until nothing is left in the window: OpenAI's x-ratelimit-reset meaning."""
        return max(0.0, self.events[-1][0] + self.length - now) if self.events else 0.0


class LeakyBucket:
    """A short-window token quota as a provider enforces it: the bucket holds up to one window's share and
    drains at the per-minute rate; a request fits when the bucket has room for it, and one larger than the
    share fits an empty bucket (else the per-minute limit would admit requests no short window ever could)."""

    __slots__ = ("capacity", "rate", "level", "stamp", "length")

    def __init__(self, capacity: float, rate: float, length: float) -> None:
        self.capacity = capacity
        self.rate = rate  # per second
        self.length = length
        self.level = 0.0
        self.stamp = 0.0

    def wait_for(self, now: float, amount: int) -> float:
        level = max(0.0, self.level - self.rate * (now - self.stamp))
        room = max(0.0, self.capacity - amount)
        return 0.0 if level <= room else max(0.001, (level - room) / self.rate)

    def add(self, now: float, amount: int) -> None:
        self.level = max(0.0, self.level - self.rate * (now - self.stamp)) + amount
        self.stamp = now


@dataclass(slots=True)
class Refusal:
    """Why a request was refused: which budget, its per-minute limit, and when to retry."""

    budget: str  # "requests" | "tokens"
    limit: float
    used: int
    requested: int
    wait: float
    too_large: bool = False  # larger than the whole limit: no wait helps


@dataclass(slots=True)
class LimitGate:
    """Admission against every window of every configured budget."""

    limits: dict[str, float]  # budget -> limit per ``main`` seconds
    main: float = 60.0
    extra: tuple[float, ...] = ()  # shorter windows, each enforcing its pro-rata share
    windows: dict[str, list[SlidingWindow | LeakyBucket]] = field(default_factory=dict)
    measured: dict[str, list[SlidingWindow]] = field(default_factory=dict)  # peaks per window length
    offered: dict[float, SlidingWindow] = field(default_factory=dict)  # requests received, admitted or not

    def __post_init__(self) -> None:
        lengths = (self.main, *(w for w in self.extra if w != self.main))
        for budget, limit in self.limits.items():
            main: list[SlidingWindow | LeakyBucket] = [SlidingWindow(limit, self.main)]
            for w in lengths[1:]:  # requests: a count per short window; tokens: a bucket of that window's share
                share = limit * w / self.main
                main.append(SlidingWindow(share, w) if budget == "requests" else
                            LeakyBucket(share, limit / self.main, w))
            self.windows[budget] = main
            self.measured[budget] = [SlidingWindow(float("inf"), w) for w in lengths]
        self.offered = {w: SlidingWindow(float("inf"), w) for w in lengths}

    @property
    def active(self) -> bool:
        return bool(self.limits)

    def admit(self, amounts: dict[str, int], now: float | None = None) -> Refusal | None:
        """Admit a request of ``amounts`` (per budget), or say why not; refused requests do not count."""
        now = time.monotonic() if now is None else now
        for w in self.offered.values():
            w.expire(now)
            w.add(now, 1)
        worst: Refusal | None = None
        for budget, wins in self.windows.items():
            amount = amounts.get(budget, 0)
            main = wins[0]
            assert isinstance(main, SlidingWindow)
            if amount > main.limit:
                return Refusal(budget, main.limit, main.total, amount, 0.0, too_large=True)
            wait = max(w.wait_for(now, amount) for w in wins)
            if wait and (worst is None or wait > worst.wait):
                worst = Refusal(budget, main.limit, main.total, amount, wait)
        if worst is not None:
            return worst
        for budget, wins in self.windows.items():
            window: SlidingWindow | LeakyBucket
            for window in (*wins, *self.measured[budget]):
                if isinstance(window, SlidingWindow):
                    window.expire(now)
                window.add(now, amounts.get(budget, 0))
        return None

    def headers(self, now: float | None = None) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the main window of each budget."""
        now = time.monotonic() if now is None else now
        h = {}
        for budget, wins in self.windows.items():
            main = wins[0]
            assert isinstance(main, SlidingWindow)
            main.expire(now)
            h[f"x-ratelimit-limit-{budget}"] = f"{main.limit:g}"
            h[f"x-ratelimit-remaining-{budget}"] = f"{max(0, main.limit - main.total):g}"
            h[f"x-ratelimit-reset-{budget}"] = _go_duration(main.full_reset_in(now))
        return h

    def peaks(self) -> dict[str, dict[str, int]]:
        """The most admitted (and, under ``offered``, received) in any window of each length."""
        out = {budget: {f"{w.length:g}": w.peak for w in wins} for budget, wins in self.measured.items()}
        out["offered"] = {f"{w.length:g}": w.peak for w in self.offered.values()}
        return out


def _go_duration(seconds: float) -> str:
    """A Go-style duration as OpenAI writes them: ``6m0s``, ``1.5s``, ``12ms``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    minutes, secs = divmod(seconds, 60)
    if minutes >= 1:
        return f"{int(minutes)}m{secs:.0f}s"
    return f"{secs:.3g}s"


def refusal_response(model: str, r: Refusal, style: str, limit_headers: dict[str, str]) -> web.Response:
    """A 429 worded as each provider words it (see batch.sim_limits)."""
    unit = "RPM" if r.budget == "requests" else "TPM"
    where = f"for {model} in organization org-sim on {r.budget} per min ({unit})"
    if r.too_large:
        return error_response(429, f"Request too large {where}: Limit {r.limit:g}, Requested {r.requested}. "
                              "The input or output tokens must be reduced in order to run successfully.",
                              "rate_limit_exceeded", type=r.budget, headers=limit_headers if style == "openai" else None)
    if style == "openai":
        msg = (f"Rate limit reached {where}: Limit {r.limit:g}, Used {r.used}, Requested {r.requested}. "
               f"Please try again in {_seconds(r.wait)}.")
        return error_response(429, msg, "rate_limit_exceeded", headers=limit_headers, type=r.budget)
    headers = {"Retry-After": f"{max(1, round(r.wait))}"}
    if style == "openrouter":
        headers.update({"X-RateLimit-Limit": f"{r.limit:g}", "X-RateLimit-Remaining": "0",
                        "X-RateLimit-Reset": str(int((time.time() + r.wait) * 1000))})
    return error_response(429, "Rate limit exceeded", 429, headers=headers)


def _seconds(wait: float) -> str:
    """OpenAI's wording of a wait: ``1.574s`` or ``20ms``."""
    return f"{wait * 1000:.0f}ms" if wait < 1 else f"{wait:.3f}s"
