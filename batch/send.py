"""One attempt at one model: the slow-start gate, the in-flight limit, the model's budgets, the cost cap,
the HTTP call, and the accounting of what came back (billing, limits, the attempt log).

``Sender`` is the half of the router (batch/router.py) that talks to the
provider; the router decides what to do with each outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from batch.attempts import AttemptLog
from batch.budget import Budget
from batch.errors import FallbackError, ProviderError, TransientError
from batch.limits import Ticket
from batch.prompts import Request
from batch.provider import Reply, send
from batch.result import Result
from batch.target import Target

UNREACHABLE_KINDS = ("connection",)  # refused or unresolvable: nothing listens at the URL


class RunStopped(Exception):
    """The run is stopping (fatal provider error, budget): leave the row for a resume."""


class ModelClosed(Exception):
    """While this attempt waited for a slot or a budget, its model's breaker opened or the model left
    the chain: nothing was sent, and the router decides again."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    max_attempts: int
    timeout: float
    fallback: bool
    backoff_base: float
    backoff_max: float
    max_rate_limit_waits: int
    max_tokens: int  # completion reserve for the token budget
    length_is_failure: bool = False
    spill_on_rate_limit: bool = False  # a row whose model is rate limited moves to the next model
    keep_response_body: bool = False  # output.raw_response
    max_wait: float = 60.0  # no single wait (Retry-After, reset, probe) is longer
    concurrency: int = 64  # requests in flight at once, whatever the number of rows waiting


class Row:
    """What one row has spent so far across attempts and models, and its last checked answer."""

    __slots__ = ("sent", "charged", "billed_prompt", "billed_completion", "parsed", "invalid_answer", "started",
                 "clock", "in_flight")

    def __init__(self) -> None:
        self.sent = 0
        self.charged = 0.0  # billed for replies that are not the row's answer
        self.billed_prompt = 0  # tokens of every billed reply of the row, its answer included
        self.billed_completion = 0
        self.parsed: Any = None
        self.invalid_answer: str | None = None  # kept on the error row when no valid answer came
        self.started = 0.0  # unix time the last attempt was sent (the attempt log)
        self.clock = 0.0  # perf_counter at that moment, for the latency of failures
        self.in_flight = False


class Sender:
    """Sends attempts. Slow start: the run's very first request goes alone, so a bad key or a missing
    model costs one request, not ``concurrency`` of them."""

    def __init__(self, session: aiohttp.ClientSession, policy: Policy, budget: Budget,
                 on_budget: Callable[[], None], log: AttemptLog | None) -> None:
        self.session = session
        self.policy = policy
        self.budget = budget
        self.on_budget = on_budget
        self.log = log
        self.stopping = False
        self.last_success = time.monotonic()
        self.failures_since_success = 0
        self.ever_answered = False  # any HTTP answer at all this run (an error is an answer too)
        self.unreachable_since: float | None = None  # first connection failure while nothing ever answered
        self.unreachable_url = ""
        self.unreachable_error = ""
        self.in_flight = 0
        self._slots = asyncio.Semaphore(policy.concurrency)
        self._opened = asyncio.Event()
        self._first_claimed = False

    async def send(self, req: Request, t: Target, body: bytes, row: Row, extra_prompt: int = 0,
                   probe: bool = False) -> Reply:
        """One attempt. ``extra_prompt``: estimated tokens a repair conversation adds to the row's prompt;
        ``probe``: this is the breaker's one half-open probe."""
        first = await self._slow_start()
        try:
            async with self._slots:
                return await self._send_in_slot(req, t, body, row, extra_prompt, probe)
        finally:
            if first and not self.stopping:
                self._opened.set()

    async def _slow_start(self) -> bool:
        if self._opened.is_set():
            return False
        if self._first_claimed:
            await self._opened.wait()
            self._check_stop()
            return False
        self._first_claimed = True
        return True

    async def _send_in_slot(self, req: Request, t: Target, body: bytes, row: Row, extra_prompt: int,
                            probe: bool) -> Reply:
        completion = req.max_tokens or self.policy.max_tokens  # a Batch line may set its own
        prompt = req.prompt_tokens + extra_prompt
        ticket = await t.limiter.acquire(prompt + completion) if t.limiter.limited else None
        self._check_stop()
        if ticket is not None and ticket.too_large:  # the model's limit, learnt while this request waited
            raise FallbackError(f"the request counts about {prompt + completion} tokens, more than the model's "
                                f"whole limit of {t.limiter.gate.limit('tokens') or 0:g} tokens per minute", model=t.model,
                                kind="request_too_large")
        if t.gone is not None or (t.breaker.is_open and not probe):  # decided while this request waited
            if ticket is not None:
                t.limiter.refund(ticket)
            raise ModelClosed(t.model)
        worst = self._reserve(t, prompt, completion, ticket)
        row.sent += 1
        t.stats.requests += 1
        row.started, row.clock, row.in_flight = time.time(), time.perf_counter(), True
        self.in_flight += 1
        try:
            reply = await send(self.session, t.endpoint, t.model, body, self.policy.timeout)
        except ProviderError as e:
            self._answered_with(t, e)
            self.budget.release(worst)
            self.budget.bill(t.label, e.charged_usd, *e.charged_tokens)
            if e.charged_usd:
                self._count_billed(t, row, *e.charged_tokens)
            if ticket is not None and (e.status == 429 or e.kind in UNREACHABLE_KINDS):
                t.limiter.refund(ticket)  # a 429, or a connection never made, was not counted by the provider
            raise
        except BaseException:
            self.budget.release(worst)
            self.budget.bill(t.label, worst)  # cancelled mid-flight: assume it was billed
            raise
        finally:
            self.in_flight -= 1
            row.in_flight = False
        self.ever_answered = True
        self.budget.release(worst)
        self.budget.bill(t.label, t.cost_of(reply)[0], reply.prompt_tokens, reply.completion_tokens)
        self._count_billed(t, row, reply.prompt_tokens, reply.completion_tokens)
        self._steer(t, reply, ticket)
        return reply

    def _reserve(self, t: Target, prompt: int, completion: int, ticket: Ticket | None) -> float:
        """The cost cap: reserve this request's worst case, or stop the run."""
        if self.budget.max_usd is None:
            return 0.0
        worst = t.worst_cost(prompt, completion)
        if not self.budget.reserve(worst):
            if ticket is not None:
                t.limiter.refund(ticket)
            self.stopping = True
            self.on_budget()
            raise RunStopped("budget reached")
        return worst

    def _answered_with(self, t: Target, e: ProviderError) -> None:
        if e.status is not None:
            self.ever_answered = True
        elif e.kind in UNREACHABLE_KINDS and not self.ever_answered and self.unreachable_since is None:
            self.unreachable_since = time.monotonic()
            self.unreachable_url, self.unreachable_error = t.endpoint.url, e.detail

    def unreachable(self, e: TransientError) -> bool:
        """Nothing has ever answered this run and this is a refused or unresolvable connection."""
        return not self.ever_answered and e.kind in UNREACHABLE_KINDS

    @staticmethod
    def _steer(t: Target, reply: Reply, ticket: Ticket | None) -> None:
        """Tell the model's limiter what the reply said about the provider's limits and usage."""
        if (r := reply.rate) is not None:
            t.steer.observe(r.limit_requests, r.limit_tokens, r.remaining_requests, r.remaining_tokens,
                            r.reset_requests, r.reset_tokens)
        used = reply.prompt_tokens + reply.completion_tokens
        t.steer.answered(used)
        if ticket is not None:
            t.limiter.settle(ticket, used)

    @staticmethod
    def _count_billed(t: Target, row: Row, prompt: int, completion: int) -> None:
        row.billed_prompt += prompt
        row.billed_completion += completion
        t.stats.billed_prompt_tokens += prompt
        t.stats.billed_completion_tokens += completion

    def answered(self) -> None:
        self.last_success = time.monotonic()
        self.failures_since_success = 0

    def _failed(self, t: Target, e: ProviderError, row: Row, reply: Reply | None = None) -> None:
        t.stats.errors[e.kind] += 1
        self.failures_since_success += 1
        if reply is not None:
            self._charge(t, row, reply)
        elif e.charged_usd:
            self._add_charge(t, row, e.charged_usd)

    def _charge(self, t: Target, row: Row, reply: Reply) -> None:
        """A reply that will not be the row's answer was still billed: count it on the row and in stats."""
        if charged := t.cost_of(reply)[0]:
            self._add_charge(t, row, charged)

    @staticmethod
    def _add_charge(t: Target, row: Row, charged: float) -> None:
        row.charged += charged
        t.stats.cost_usd += charged
        t.stats.charged_failures += 1

    def _check_stop(self) -> None:
        if self.stopping:
            raise RunStopped("run is stopping")

    def log_attempt(self, req: Request, t: Target, row: Row, level: int, then: str,
                    error: ProviderError | None = None, reply: Reply | None = None,
                    outcome: str | None = None) -> None:
        """One row of the attempt log for the attempt just made (``then``: what the router does next)."""
        if (log := self.log) is None:
            return
        status: int | None = 200
        tokens: tuple[int | None, int | None] = (None, None)
        if reply is not None:
            cost, latency = t.cost_of(reply)[0], reply.latency_ms
            tokens = (reply.prompt_tokens, reply.completion_tokens)
        else:
            cost, status = (error.charged_usd, error.status) if error is not None else (None, None)
            latency = (time.perf_counter() - row.clock) * 1000
        log.add(req.id, row.sent, "online", t.provider, t.model, level, row.started, latency, status,
                outcome or (error.kind if error is not None else "ok"), tokens[0], tokens[1], cost, then,
                str(error) if error is not None else None)

    def log_cache_hit(self, req: Request, hit: Result) -> None:
        if self.log is not None:
            self.log.add(req.id, 0, "cache", hit.provider or "", hit.model or "", hit.fallback_level or 0,
                         time.time(), None, None, "ok", hit.prompt_tokens, hit.completion_tokens, 0.0, "done", None)
