"""The Ray engine's one limiter for the whole cluster: a detached named actor per output, and its faces.

``LimiterService`` runs as one named, detached async actor per output
directory (``service_name``): ``lifetime="detached"`` so it does not die with
the worker that happened to create it (RAY.md, A2: a first try lost it that
way), ``get_if_exists=True`` so every worker and the driver find the same one,
``max_restarts=-1``. It holds, per model, a ``ModelLimiter`` (batch/limits.py:
a ``Gate`` with its GCRA paces and 60 s hard cap, driven by the actor's event
loop), the cost cap's ledger, and the run's stop reason.

Leases: a worker leases one request (with its token estimate) per call. The
Gate spaces grants by GCRA, so its burst is one request; the measured call
cost (p50 1.5 ms, about 1,100 calls/s from one actor) is ample for limits up
to a few hundred requests per second. A restarted actor starts empty: each
model's request pace starts owing one request, so a restart grants no burst.

``ClusterLimiter`` is what a worker's ``Target`` holds instead of a
``ModelLimiter`` (a subclass, so the router, sender and steering use it
unchanged): ``acquire`` asks the actor; ``pause``, ``set_limit``, ``settle``
and ``refund`` are sent to it without waiting, so a 429 or a rate-limit
header seen by any worker slows every worker at once. It keeps a local mirror
of the limits (what steering reads) and of its own pauses.

``ClusterBudget`` is the worker's ``Budget``: it leases allowance from the
actor a few requests' worst case at a time, so the cap holds across workers;
near the cap a worker may stop a few requests early (allowance held by
another worker), never late. A restarted actor has lost the ledger: the run
then stops (rerun to resume) rather than spend without a cap.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch.budget import Budget
from batch.limits import ModelLimiter, Ticket
from batch.spend import SpendJournal

NAMESPACE = "batch"
LEASE_REQUESTS = 4  # a worker leases this many requests' worst case of budget at a time
LOST = -1.0  # the service's answer when its budget ledger was lost in a restart


def service_name(out: Path) -> str:
    """The limiter actor's name: one per output directory."""
    return "batch-limiter-" + hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]


class LimiterService:
    """The actor's body (``ray.remote`` is applied by ``service_handle``); every method is a coroutine, so
    all run on the actor's one event loop."""

    def __init__(self) -> None:
        self.limiters: dict[str, ModelLimiter] = {}
        self.tickets: dict[str, tuple[str, Ticket]] = {}
        self.cancelled: set[str] = set()
        self.configured = False
        self.max_usd: float | None = None
        self.spent = 0.0
        self.granted = 0.0  # allowance held by workers
        self.stop_reason: str | None = None

    async def configure(self, max_usd: float | None, spent: float) -> None:
        """A run starts: its cost cap, what earlier runs spent, no stop."""
        self.configured, self.max_usd, self.spent, self.granted = True, max_usd, spent, 0.0
        self.stop_reason = None

    def _limiter(self, label: str, rpm: float | None, tpm: float | None) -> ModelLimiter:
        limiter = self.limiters.get(label)
        if limiter is None:
            limiter = self.limiters[label] = ModelLimiter(rpm, tpm)
            if limiter.gate.requests is not None:
                limiter.gate.requests.debt = 1.0  # start empty: the first grant waits one interval
        return limiter

    async def acquire(self, label: str, tokens: float, lease: str, rpm: float | None, tpm: float | None) -> bool:
        """Wait for one request of ``tokens``; returns whether it is larger than the whole token limit."""
        limiter = self._limiter(label, rpm, tpm)
        ticket = await limiter.acquire(tokens)
        if lease in self.cancelled:  # the worker gave up waiting
            self.cancelled.discard(lease)
            limiter.refund(ticket)
        else:
            self.tickets[lease] = (label, ticket)
        return ticket.too_large

    async def cancel(self, lease: str) -> None:
        if (held := self.tickets.pop(lease, None)) is not None:
            self.limiters[held[0]].refund(held[1])
        else:
            self.cancelled.add(lease)

    async def settle(self, lease: str, used: float) -> None:
        if (held := self.tickets.pop(lease, None)) is not None:
            self.limiters[held[0]].settle(held[1], used)

    async def refund(self, lease: str) -> None:
        if (held := self.tickets.pop(lease, None)) is not None:
            self.limiters[held[0]].refund(held[1])

    async def pause(self, label: str, seconds: float, rpm: float | None, tpm: float | None) -> None:
        self._limiter(label, rpm, tpm).pause(seconds)

    async def set_limit(self, label: str, which: str, per_minute: float, rpm: float | None,
                        tpm: float | None) -> None:
        self._limiter(label, rpm, tpm).set_limit(which, per_minute)

    async def lease_budget(self, want: float, need: float) -> float:
        """Allowance for a worker: up to ``want``, 0 when not even ``need`` is left, LOST after a restart."""
        if not self.configured:
            return LOST
        if self.max_usd is None:
            return want
        grant = min(want, self.max_usd - self.spent - self.granted)
        if grant < need:
            return 0.0
        self.granted += grant
        return grant

    async def bill(self, cost: float) -> None:
        self.spent += cost
        self.granted -= cost

    async def give_back(self, amount: float) -> None:
        self.granted -= amount

    async def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    async def stopped(self) -> str | None:
        return self.stop_reason

    async def spend(self) -> tuple[float, float]:
        return self.spent, self.granted


def service_handle(out: Path) -> Any:
    """The output's limiter actor, created on first use (call within a connected Ray)."""
    import ray

    actor = ray.remote(LimiterService).options(
        name=service_name(out), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, num_cpus=0, max_concurrency=10_000)
    return actor.remote()


@dataclass(slots=True)
class LeaseTicket(Ticket):
    """A Ticket held by the limiter actor under ``lease``."""

    lease: str = ""


class ClusterLimiter(ModelLimiter):
    """A model's limiter in a Ray worker: the budgets live in the limiter actor."""

    def __init__(self, service: Any, label: str, requests_per_minute: float | None,
                 tokens_per_minute: float | None) -> None:
        super().__init__(requests_per_minute, tokens_per_minute)
        self.service, self.label = service, label
        self.configured = (requests_per_minute, tokens_per_minute)
        self.pending = 0
        self._prefix = uuid.uuid4().hex[:12]
        self._count = itertools.count()

    @property
    def waiting(self) -> int:
        return self.pending

    async def acquire(self, tokens: float) -> Ticket:
        lease = f"{self._prefix}-{next(self._count)}"
        self.pending += 1
        try:
            too_large = await self.service.acquire.remote(self.label, tokens, lease, *self.configured)
        except asyncio.CancelledError:
            self.service.cancel.remote(lease)
            raise
        finally:
            self.pending -= 1
        return LeaseTicket(tokens, too_large=bool(too_large), lease=lease)

    def pause(self, seconds: float) -> None:
        self.gate.paused_until = max(self.gate.paused_until, self.clock() + seconds)
        self.service.pause.remote(self.label, seconds, *self.configured)

    def settle(self, ticket: Ticket, used_tokens: float) -> None:
        if isinstance(ticket, LeaseTicket):
            self.service.settle.remote(ticket.lease, used_tokens)

    def refund(self, ticket: Ticket) -> None:
        if isinstance(ticket, LeaseTicket):
            self.service.refund.remote(ticket.lease)

    def set_limit(self, which: str, per_minute: float) -> None:
        self.gate.set_limit(which, per_minute, self.clock())
        self.service.set_limit.remote(self.label, which, per_minute, *self.configured)


class ClusterBudget(Budget):
    """The cost cap in a Ray worker: allowance leased from the limiter actor (see the module docstring)."""

    def __init__(self, service: Any, max_usd: float | None, journal: SpendJournal | None) -> None:
        super().__init__(max_usd, journal=journal)
        self.service = service
        self.allowance = 0.0
        self.lost = False

    def reserve(self, amount: float) -> bool:
        if self.max_usd is None:
            return True
        if self.allowance < amount and not self.lost:
            import ray

            got = float(ray.get(self.service.lease_budget.remote(LEASE_REQUESTS * amount, amount - self.allowance)))
            self.lost = got == LOST
            self.allowance += max(got, 0.0)
        if self.allowance < amount:
            return False
        self.allowance -= amount
        self.reserved += amount
        return True

    def release(self, reserved: float) -> None:
        if self.max_usd is not None:
            self.reserved -= reserved
            self.allowance += reserved

    def bill(self, label: str, cost: float | None, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        super().bill(label, cost, prompt_tokens, completion_tokens)
        if cost and self.max_usd is not None:
            self.allowance -= cost
            self.service.bill.remote(cost)

    def give_back(self) -> None:
        if self.max_usd is not None and self.allowance > 0:
            self.service.give_back.remote(self.allowance)
            self.allowance = 0.0
