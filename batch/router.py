"""Stage 6: a ``Request`` -> a ``Result``: retry, fallback, circuit breakers.

For each model of the chain in order, up to ``max_attempts`` attempts:

- ``TransientError`` (timeouts, resets, 5xx, bad bodies): back off with full
  jitter, or exactly as long as the provider asked; then retry.
- ``RateLimited`` (429): pause the whole model and wait; this does not use up
  the row's attempts (being throttled is not the row's fault), up to
  ``max_rate_limit_waits``.
- ``FallbackError`` / ``RejectedError``: go to the next model at once.
- ``FatalError`` (bad key, no credits): stop the run; the row gets *no*
  result, so a resume redoes it.

A ``Breaker`` per model (batch/breaker.py) skips a model that keeps failing
for a cool-down and then lets one probe through; ``Budget`` (batch/budget.py)
holds the cost cap; ``Repairs`` (batch/repair.py) asks again when an answer
fails [output_format]. This module consumes ProviderErrors; it never raises
them. ``RunStopped`` tells the worker to drop the row unrecorded.

With a response cache, a row is first looked up (batch/lookup.py): a hit is
an ``ok`` row with no request; in replay mode a miss is a ``cache_miss`` row.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import aiohttp
import orjson

from batch.answers import Checker
from batch.attempts import AttemptLog
from batch.breaker import Breaker
from batch.budget import Budget
from batch.cache import ResponseCache
from batch.errors import FallbackError, FatalError, ProviderError, RateLimited, RejectedError, TransientError
from batch.limits import ModelLimiter
from batch.lookup import first_keys, from_cache, looks_up, miss_message
from batch.prompts import Request
from batch.provider import Endpoint, Reply, send
from batch.repair import Repairs
from batch.result import Result, error_result, result_row
from batch.stats import ModelStats


class RunStopped(Exception):
    """The run is stopping (fatal provider error, budget): leave the row for a resume."""


@dataclass(slots=True)
class Target:
    """One model of the chain, with everything needed to call it."""

    level: int
    model: str
    provider: str
    prefix: bytes  # b'{"model":"x",' (plus OpenRouter's "models" list, and response_format when set)
    server_fallback: tuple[str, ...]  # the later models of OpenRouter's "models" list (run.server_fallback)
    cache_salt: bytes  # the provider's configured base URL and a NUL: part of every cache key
    endpoint: Endpoint
    limiter: ModelLimiter
    breaker: Breaker
    stats: ModelStats
    price_in: float | None  # USD per token
    price_out: float | None

    def worst_cost(self, prompt_tokens: int, max_tokens: int) -> float:
        if self.price_in is None or self.price_out is None:
            return 0.0  # unknown prices: only the reported spend counts against the budget
        return prompt_tokens * self.price_in + max_tokens * self.price_out

    def cost_of(self, reply: Reply) -> tuple[float | None, str | None]:
        if reply.cost is not None:
            return reply.cost, "provider"
        if self.price_in is not None and self.price_out is not None:
            return reply.prompt_tokens * self.price_in + reply.completion_tokens * self.price_out, "price_table"
        return None, None


def model_prefix(model: str, server_fallback: Sequence[str] = (),
                 response_format: Mapping[str, Any] | None = None) -> bytes:
    """The start of a body for ``model``; ``server_fallback`` adds OpenRouter's ``models`` list,
    ``response_format`` this model's structured-output request ([output_format])."""
    prefix = b'{"model":' + orjson.dumps(model) + b","
    if server_fallback:
        prefix += b'"models":' + orjson.dumps([model, *server_fallback]) + b","
    if response_format is not None:
        prefix += b'"response_format":' + orjson.dumps(response_format) + b","
    return prefix


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


class _Row:
    """What one row has spent so far across attempts and models, and its last checked answer."""

    __slots__ = ("sent", "charged", "parsed", "invalid_answer", "started", "clock", "in_flight")

    def __init__(self) -> None:
        self.sent = 0
        self.started = 0.0  # unix time the last attempt was sent (the attempt log)
        self.clock = 0.0  # perf_counter at that moment, for the latency of failures
        self.in_flight = False
        self.charged = 0.0
        self.parsed: Any = None
        self.invalid_answer: str | None = None  # kept on the error row when no valid answer came


class Router:
    """Routes rows through the chain. Slow start: the run's very first request
    goes alone, so a bad key or a missing model costs one request, not
    ``concurrency`` of them."""

    def __init__(self, session: aiohttp.ClientSession, targets: Sequence[Target], policy: Policy,
                 on_fatal: Callable[[FatalError], None], budget: Budget | None = None,
                 on_budget: Callable[[], None] = lambda: None, *, cache: ResponseCache | None = None,
                 row_chains: Mapping[str, Sequence[Target]] | None = None, checker: Checker | None = None,
                 max_repairs: int = 0, log: AttemptLog | None = None) -> None:
        self.session = session
        self.budget = budget or Budget(None)
        self.on_budget = on_budget
        width = None if policy.fallback else 1
        self.targets = list(targets)[:width]
        # OpenAI Batch lines with their own body.model (body_model = "keep") start at that model
        self.row_chains = {m: list(chain)[:width] for m, chain in (row_chains or {}).items()}
        self.cache = cache
        self.log = log
        self.checker = checker
        self.max_repairs = max_repairs
        self.policy = policy
        self.on_fatal = on_fatal
        self.stopping = False
        self.last_success = time.monotonic()
        self.failures_since_success = 0
        self._opened = asyncio.Event()
        self._first_claimed = False

    async def route(self, req: Request) -> Result:
        if req.problem is not None:
            return error_result(req, req.problem[0], req.problem[1], attempts=0)
        chain = self._chain(req)
        cache = self.cache
        keys: list[bytes] = []  # the row's cache key per model of its chain, once looked up
        if cache is not None and looks_up(req, cache):
            hit = from_cache(req, chain, cache, keys, checker=self.checker,
                             length_is_failure=self.policy.length_is_failure,
                             keep_body=self.policy.keep_response_body)
            if hit is not None:
                if self.log is not None:
                    self.log.add(req.id, 0, "cache", hit.provider or "", hit.model or "", hit.fallback_level or 0,
                                 time.time(), None, None, "ok", hit.prompt_tokens, hit.completion_tokens, 0.0, "done",
                                 None)
                return hit
            if not cache.writable:
                return error_result(req, "cache_miss", miss_message(req, cache), attempts=0)
        row = _Row()
        last: ProviderError | None = None
        final = len(chain) - 1
        for level, t in enumerate(chain):
            if level > 0:
                t.stats.fallbacks_in += 1
            reply, last = await self._attempts(req, t, row, last, level=level, is_last=level == final)
            if reply is not None:
                if cache is not None and keys:  # looked up, so cacheable: store the answer
                    cache.put(keys[level], reply.raw, t.model)
                return self._ok(req, t, reply, row, level, chain)
        assert last is not None
        return error_result(req, last.kind, str(last), attempts=row.sent, level=final, model=last.model,
                            charged=row.charged,
                            output=row.invalid_answer if last.kind == "invalid_output" else None)

    def prefetch(self, reqs: Sequence[Request]) -> None:
        """Look up a batch of rows' first-choice cache keys in one go (the reader calls this per batch)."""
        if self.cache is not None and (keys := first_keys(reqs, self._chain, self.cache)):
            self.cache.prefetch(keys)

    def _chain(self, req: Request) -> list[Target]:
        return self.targets if req.model is None else self.row_chains.get(req.model, self.targets)

    async def _attempts(self, req: Request, t: Target, row: _Row, last: ProviderError | None, *,
                        level: int, is_last: bool) -> tuple[Reply | None, ProviderError | None]:
        """Up to max_attempts tries at one model; returns (reply, last error).

        Every attempt asks the breaker first and reports its outcome after
        (success, failure, or release for outcomes that say nothing of health).
        """
        p = self.policy
        tries = waits = 0
        body = req.body_for(t.prefix)
        repairs = Repairs(self.checker, self.max_repairs, req) if self.checker is not None else None
        while tries < p.max_attempts:
            self._check_stop()
            if p.spill_on_rate_limit and not is_last and t.limiter.paused:
                return None, last or RateLimited("model is paused by its rate limit", model=t.model)
            if not t.breaker.allow():
                if not is_last:
                    return None, last or TransientError("circuit open", model=t.model, kind="circuit_open")
                await asyncio.sleep(t.breaker.seconds_to_probe())  # nowhere else to go: wait for the probe
                continue
            try:
                reply = await self._send(req, t, body, row, repairs.extra_tokens if repairs else 0)
            except RateLimited as e:
                last, waits = e, waits + 1
                gave_up = self._rate_limited(t, req, e, waits, is_last)
                self._log(req, t, row, level, _then(gave_up, is_last, "wait"), e)
                if gave_up:
                    return None, e
                continue
            except TransientError as e:
                last, tries = e, tries + 1
                self._log(req, t, row, level, _then(tries >= p.max_attempts, is_last, "retry"), e)
                await self._transient(t, e, row, tries)
                continue
            except (FallbackError, RejectedError) as e:
                t.breaker.release()
                self._failed(t, e, row)
                self._log(req, t, row, level, _then(True, is_last, ""), e)
                return None, e
            except FatalError as e:
                self._log(req, t, row, level, "stopped", e)
                self._fatal(t, e)
            except BaseException:
                t.breaker.release()
                if row.in_flight:  # cut off mid-request by a hard stop
                    self._log(req, t, row, level, "stopped", outcome="cancelled")
                raise
            self._succeeded(t)
            if p.length_is_failure and reply.finish_reason == "length" and not is_last:
                cut = FallbackError("answer cut at max_tokens", model=t.model, kind="truncated")
                self._failed(t, cut, row, reply)
                self._log(req, t, row, level, "fallback", cut, reply)
                return None, cut
            next_body, invalid = self._judge(t, reply, row, repairs) if repairs is not None else (None, None)
            if next_body is None:
                self._log(req, t, row, level, "done" if invalid is None else _then(True, is_last, ""), invalid, reply)
                return (reply, last) if invalid is None else (None, invalid)
            self._log(req, t, row, level, "repair", reply=reply, outcome="invalid_output")
            body = next_body
        return None, last

    def _rate_limited(self, t: Target, req: Request, e: RateLimited, waits: int, is_last: bool) -> bool:
        """A 429: give the request's budget back and pause the model. True: stop waiting for this model."""
        p = self.policy
        t.breaker.release()
        t.stats.rate_limited += 1
        t.limiter.refund(req.prompt_tokens + (req.max_tokens or p.max_tokens))
        wait = e.retry_after if e.retry_after is not None else self._backoff(waits - 1)
        t.limiter.on_rate_limited(wait, e.scope, e.limit_requests, e.limit_tokens)
        if waits > p.max_rate_limit_waits or (p.spill_on_rate_limit and not is_last):
            t.stats.errors[e.kind] += 1
            return True
        return False

    async def _transient(self, t: Target, e: TransientError, row: _Row, tries: int) -> None:
        """A failure worth retrying: count it, then back off unless the attempts are used up."""
        t.breaker.failure(e)
        self._failed(t, e, row)
        if tries < self.policy.max_attempts:
            t.stats.retries += 1
            await asyncio.sleep(self._backoff(tries - 1, e.retry_after))

    def _fatal(self, t: Target, e: FatalError) -> NoReturn:
        """The key or account is unusable: stop the whole run, leaving this row for the resume."""
        t.breaker.release()
        t.stats.errors[e.kind] += 1
        self.stopping = True
        self._opened.set()
        self.on_fatal(e)
        raise RunStopped(str(e)) from None

    def _succeeded(self, t: Target) -> None:
        t.breaker.success()
        self.last_success = time.monotonic()
        self.failures_since_success = 0

    def _judge(self, t: Target, reply: Reply, row: _Row, repairs: Repairs
               ) -> tuple[bytes | None, ProviderError | None]:
        """Check an answer against [output_format]: (None, None) when valid; else the repair
        request to send next, or (None, error) when the repairs at this model are used up."""
        row.parsed, problem = repairs.judge(reply.text, reply.finish_reason)
        if problem is None:
            return None, None
        t.stats.invalid_outputs += 1
        row.invalid_answer = reply.text
        if repairs.exhausted:
            e = FallbackError(f"invalid output after {repairs.count} repairs: {problem}", model=t.model,
                              kind="invalid_output")
            self._failed(t, e, row, reply)
            return None, e
        t.stats.repairs += 1
        self._charge(t, row, reply)  # an invalid answer is billed like any other
        return repairs.next_body(t.prefix, reply.text, problem), None

    async def _send(self, req: Request, t: Target, body: bytes, row: _Row, extra_prompt: int = 0) -> Reply:
        """One attempt: the slow-start gate, the model's budgets, then the HTTP call.

        ``extra_prompt``: estimated tokens a repair conversation adds to the row's own prompt."""
        first = False
        if not self._opened.is_set():
            if self._first_claimed:
                await self._opened.wait()
                self._check_stop()
            else:
                self._first_claimed = first = True
        completion = req.max_tokens or self.policy.max_tokens  # a Batch line may set its own
        prompt = req.prompt_tokens + extra_prompt
        reserved = prompt + completion
        limiter = t.limiter
        budget = self.budget
        try:
            if limiter.limited:  # the common unlimited case costs no coroutine
                await limiter.acquire(reserved)
                self._check_stop()
            worst = 0.0
            if budget.max_usd is not None:
                worst = t.worst_cost(prompt, completion)
                if not budget.reserve(worst):
                    self.stopping = True
                    self.on_budget()
                    raise RunStopped("budget reached")
            row.sent += 1
            t.stats.requests += 1
            limiter.sent()
            row.started, row.clock, row.in_flight = time.time(), time.perf_counter(), True
            try:
                reply = await send(self.session, t.endpoint, t.model, body, self.policy.timeout)
            except ProviderError as e:
                budget.release(worst)
                budget.bill(t.stats.label, e.charged_usd)
                raise
            except BaseException:
                budget.release(worst)
                budget.bill(t.stats.label, worst)  # cancelled mid-flight: assume it was billed
                raise
            budget.release(worst)
            budget.bill(t.stats.label, t.cost_of(reply)[0], reply.prompt_tokens, reply.completion_tokens)
            self._steer(limiter, reply, reserved)
            return reply
        finally:
            row.in_flight = False
            if first and not self.stopping:
                self._opened.set()

    @staticmethod
    def _steer(limiter: ModelLimiter, reply: Reply, reserved: int) -> None:
        """Tell the model's limiter what the reply said about the provider's limits and usage."""
        if (r := reply.rate) is not None:
            limiter.observe(r.limit_requests, r.limit_tokens, r.remaining_requests, r.remaining_tokens,
                            r.reset_requests, r.reset_tokens)
        used = reply.prompt_tokens + reply.completion_tokens
        limiter.admitted(used)
        if limiter.limited:
            limiter.settle(reserved, used)

    def _log(self, req: Request, t: Target, row: _Row, level: int, then: str, error: ProviderError | None = None,
             reply: Reply | None = None, outcome: str | None = None) -> None:
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

    def _failed(self, t: Target, e: ProviderError, row: _Row, reply: Reply | None = None) -> None:
        t.stats.errors[e.kind] += 1
        self.failures_since_success += 1
        if reply is not None:
            self._charge(t, row, reply)
        elif e.charged_usd:
            self._add_charge(t, row, e.charged_usd)

    def _charge(self, t: Target, row: _Row, reply: Reply) -> None:
        """A reply that will not be the row's answer was still billed: count it on the row and in stats."""
        if charged := t.cost_of(reply)[0]:
            self._add_charge(t, row, charged)

    @staticmethod
    def _add_charge(t: Target, row: _Row, charged: float) -> None:
        row.charged += charged
        t.stats.cost_usd += charged
        t.stats.charged_failures += 1

    def _backoff(self, retry: int, retry_after: float | None = None) -> float:
        """Full jitter, capped; exactly the provider's wish when it stated one."""
        if retry_after is not None:
            return min(retry_after, self.policy.backoff_max * 4)
        cap = min(self.policy.backoff_max, self.policy.backoff_base * (2 ** retry))
        return random.uniform(0, cap)

    def _check_stop(self) -> None:
        if self.stopping:
            raise RunStopped("run is stopping")

    def _ok(self, req: Request, t: Target, reply: Reply, row: _Row, level: int, chain: Sequence[Target]) -> Result:
        cost, source = t.cost_of(reply)
        s = t.stats
        s.ok += 1
        s.prompt_tokens += reply.prompt_tokens
        s.completion_tokens += reply.completion_tokens
        if cost is not None:
            s.cost_usd += cost
            cost += row.charged  # the row's cost includes failed attempts that were billed
        s.latencies.append(reply.latency_ms)
        if reply.model != t.model:  # OpenRouter's own fallback (server_fallback) answered
            level = next((j for j, x in enumerate(chain) if x.model == reply.model), level)
        return result_row(req, attempts=row.sent, reply=reply, provider=t.provider, level=level, parsed=row.parsed,
                          cost=cost, cost_source=source, keep_body=self.policy.keep_response_body)


def _then(gives_up: bool, is_last: bool, otherwise: str) -> str:
    """What follows a failed attempt: ``otherwise`` (retry, wait) unless the row leaves this model."""
    if not gives_up:
        return otherwise
    return "failed" if is_last else "fallback"
