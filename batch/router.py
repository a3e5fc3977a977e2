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

A ``Breaker`` per model skips a model that keeps failing for a cool-down and
then lets one probe through. This module consumes ProviderErrors; it never
raises them. ``RunStopped`` tells the worker to drop the row unrecorded.

With a response cache, a row is first looked up under each model of its
chain, in order; a hit is an ``ok`` row with ``cached`` set, no request and
zero cost. In replay mode a miss is an ``error`` row (``cache_miss``) and
nothing is ever sent.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiohttp
import orjson

from batch.answers import Checker
from batch.cache import ResponseCache, cache_key
from batch.errors import FallbackError, FatalError, ProviderError, RateLimited, RejectedError, TransientError
from batch.limits import ModelLimiter
from batch.prompts import Request
from batch.provider import Endpoint, Reply, reply_from_body, send
from batch.stats import ModelStats


class RunStopped(Exception):
    """The run is stopping (fatal provider error, budget): leave the row for a resume."""


class Result(NamedTuple):
    """One output row; field names are the output columns.

    A NamedTuple rather than a frozen dataclass: it is built once per row on
    the hot path (about 4x cheaper to construct) and the sink transposes a
    part's rows into columns with one ``zip(*rows)``.
    """

    id: str
    status: str  # "ok" | "error"
    output: str | None
    parsed: Any  # the checked answer ([output_format]): a label, a dict for a struct, a regex capture
    finish_reason: str | None
    model: str | None
    provider: str | None
    fallback_level: int | None
    attempts: int
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None
    cost_usd: float | None
    cost_source: str | None  # "provider" | "price_table" | "cache" | None
    latency_ms: float | None
    error_type: str | None
    error_message: str | None
    request_hash: str
    cached: bool  # answered from the response cache: no request, no cost
    response_body: bytes | None  # the reply's JSON body (output.raw_response), else None
    keep: tuple[Any, ...]


class Breaker:
    """Consecutive-failure circuit breaker with a single half-open probe.

    closed --(``threshold`` consecutive failures)--> open --(cool-down)-->
    half-open: one probe goes through; success closes, failure reopens.
    """

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


class Budget:
    """``max_cost_usd``: each request reserves its worst case before it is sent.

    Worst case = estimated prompt tokens x input price + max_tokens x output
    price. The reply's real cost replaces the reservation, so the run never
    spends past the cap by more than what was already in flight.
    """

    def __init__(self, max_usd: float | None, *, spent: float = 0.0) -> None:
        self.max_usd = max_usd
        self.spent = spent  # earlier runs of the same output count: the cap is for the whole job
        self.reserved = 0.0

    def reserve(self, amount: float) -> bool:
        if self.max_usd is None:
            return True
        if self.spent + self.reserved + amount > self.max_usd:
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float | None) -> None:
        if self.max_usd is None:
            return
        self.reserved -= reserved
        self.spent += actual or 0.0


class _Row:
    """What one row has spent so far across attempts and models, and its last checked answer."""

    __slots__ = ("sent", "charged", "parsed", "invalid_answer")

    def __init__(self) -> None:
        self.sent = 0
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
                 max_repairs: int = 0) -> None:
        self.session = session
        self.budget = budget or Budget(None)
        self.on_budget = on_budget
        width = None if policy.fallback else 1
        self.targets = list(targets)[:width]
        # OpenAI Batch lines with their own body.model (body_model = "keep") start at that model
        self.row_chains = {m: list(chain)[:width] for m, chain in (row_chains or {}).items()}
        self.cache = cache
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
        if cache is not None and self._looks_up(req, cache):
            hit = self._from_cache(req, chain, cache, keys)
            if hit is not None:
                return hit
            if not cache.writable:
                return error_result(req, "cache_miss", _miss_message(req, cache), attempts=0)
        row = _Row()
        last: ProviderError | None = None
        final = len(chain) - 1
        for level, t in enumerate(chain):
            if level > 0:
                t.stats.fallbacks_in += 1
            reply, last = await self._attempts(req, t, row, last, is_last=level == final)
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
        cache = self.cache
        if cache is None:
            return
        keys = []
        for req in reqs:
            if req.problem is None and self._looks_up(req, cache):
                t = self._chain(req)[0]
                keys.append(cache_key(t.cache_salt, req.body_for(t.prefix)))
        if keys:
            cache.prefetch(keys)

    def _chain(self, req: Request) -> list[Target]:
        return self.targets if req.model is None else self.row_chains.get(req.model, self.targets)

    @staticmethod
    def _looks_up(req: Request, cache: ResponseCache) -> bool:
        """Read-write looks up only what it may store; replay looks up everything (it sends nothing)."""
        return req.cacheable or not cache.writable

    def _from_cache(self, req: Request, chain: Sequence[Target], cache: ResponseCache,
                    keys: list[bytes]) -> Result | None:
        """The first model of the chain whose answer to this exact request is stored.

        Fills ``keys`` with the row's key for every model of the chain, so a miss stores its
        answer without hashing the body again.
        """
        final = len(chain) - 1
        keys.extend(cache_key(t.cache_salt, req.body_for(t.prefix)) for t in chain)
        for level, t in enumerate(chain):
            raw = cache.get(keys[level])
            if raw is None:
                continue
            try:
                reply = reply_from_body(raw, t.model)
            except ProviderError:
                continue  # stored by another version or damaged: as if absent
            if self.policy.length_is_failure and reply.finish_reason == "length" and level < final:
                continue
            parsed = None
            if self.checker is not None:
                parsed, problem = self.checker.check(reply.text)
                if problem is not None:
                    continue  # stored by a job with another output_format: not an answer for this one
            cache.hits += 1
            t.stats.cache_hits += 1
            return Result(req.id, "ok", reply.text, parsed, reply.finish_reason, reply.model, t.provider, level, 0,
                          reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens,
                          reply.reasoning_tokens, 0.0, "cache", None, None, None, req.request_hash, True,
                          raw if self.policy.keep_response_body else None, req.keep)
        cache.misses += 1
        return None

    async def _attempts(self, req: Request, t: Target, row: _Row, last: ProviderError | None, *,
                        is_last: bool) -> tuple[Reply | None, ProviderError | None]:
        """Up to max_attempts tries at one model; returns (reply, last error).

        Every attempt asks the breaker first and reports its outcome after
        (success, failure, or release for outcomes that say nothing of health).
        """
        p = self.policy
        tries = waits = repairs = 0
        body = req.body_for(t.prefix)
        conversation: dict[str, Any] | None = None  # the request as a dict, once a repair needs it
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
                reply = await self._send(req, t, body, row)
            except RateLimited as e:
                t.breaker.release()
                t.stats.rate_limited += 1
                t.limiter.refund(req.prompt_tokens + (req.max_tokens or p.max_tokens))
                wait = e.retry_after if e.retry_after is not None else self._backoff(waits)
                t.limiter.on_rate_limited(wait, e.scope, e.limit_requests, e.limit_tokens)
                waits += 1
                last = e
                if waits > p.max_rate_limit_waits or (p.spill_on_rate_limit and not is_last):
                    t.stats.errors[e.kind] += 1
                    return None, e
                continue
            except TransientError as e:
                t.breaker.failure(e)
                self._failed(t, e, row)
                tries += 1
                last = e
                if tries < p.max_attempts:
                    t.stats.retries += 1
                    await asyncio.sleep(self._backoff(tries - 1, e.retry_after))
                continue
            except (FallbackError, RejectedError) as e:
                t.breaker.release()
                self._failed(t, e, row)
                return None, e
            except FatalError as e:
                t.breaker.release()
                t.stats.errors[e.kind] += 1
                self.stopping = True
                self._opened.set()
                self.on_fatal(e)
                raise RunStopped(str(e)) from None
            except BaseException:
                t.breaker.release()
                raise
            t.breaker.success()
            self.last_success = time.monotonic()
            self.failures_since_success = 0
            if p.length_is_failure and reply.finish_reason == "length" and not is_last:
                e = FallbackError("answer cut at max_tokens", model=t.model, kind="truncated")
                self._failed(t, e, row, reply)
                return None, e
            if self.checker is None:
                return reply, last
            row.parsed, problem = self.checker.check(reply.text)
            if problem is None:
                return reply, last
            if reply.finish_reason == "length":
                problem += " (the answer was cut at max_tokens: a larger [request] max_tokens may fix this)"
            t.stats.invalid_outputs += 1
            row.invalid_answer = reply.text
            if repairs >= self.max_repairs:
                e = FallbackError(f"invalid output after {repairs} repairs: {problem}", model=t.model,
                                  kind="invalid_output")
                self._failed(t, e, row, reply)
                return None, e
            repairs += 1
            t.stats.repairs += 1
            self._charge(t, row, reply)  # an invalid answer is billed like any other
            if conversation is None:
                conversation = orjson.loads(b"{" + req.tail)
            conversation["messages"] = [*conversation["messages"], *self.checker.repair_messages(reply.text, problem)]
            body = t.prefix + orjson.dumps(conversation)[1:]
        return None, last

    async def _send(self, req: Request, t: Target, body: bytes, row: _Row) -> Reply:
        """One attempt: the slow-start gate, the model's budgets, then the HTTP call."""
        first = False
        if not self._opened.is_set():
            if self._first_claimed:
                await self._opened.wait()
                self._check_stop()
            else:
                self._first_claimed = first = True
        completion = req.max_tokens or self.policy.max_tokens  # a Batch line may set its own
        reserved = req.prompt_tokens + completion
        limiter = t.limiter
        budget = self.budget
        try:
            if limiter.limited:  # the common unlimited case costs no coroutine
                await limiter.acquire(reserved)
                self._check_stop()
            worst = 0.0
            if budget.max_usd is not None:
                worst = t.worst_cost(req.prompt_tokens, completion)
                if not budget.reserve(worst):
                    self.stopping = True
                    self.on_budget()
                    raise RunStopped("budget reached")
            row.sent += 1
            t.stats.requests += 1
            limiter.sent()
            try:
                reply = await send(self.session, t.endpoint, t.model, body, self.policy.timeout)
            except ProviderError as e:
                budget.settle(worst, e.charged_usd)
                raise
            except BaseException:
                budget.settle(worst, worst)  # cancelled mid-flight: assume it was billed
                raise
            if budget.max_usd is not None:
                budget.settle(worst, t.cost_of(reply)[0])
            if (r := reply.rate) is not None:
                limiter.observe(r.limit_requests, r.limit_tokens, r.remaining_requests, r.remaining_tokens,
                                r.reset_requests, r.reset_tokens)
            used = reply.prompt_tokens + reply.completion_tokens
            limiter.admitted(used)
            if limiter.limited:
                limiter.settle(reserved, used)
            return reply
        finally:
            if first and not self.stopping:
                self._opened.set()

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
        return Result(req.id, "ok", reply.text, row.parsed, reply.finish_reason, reply.model, t.provider, level,
                      row.sent, reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens,
                      reply.reasoning_tokens, cost, source,
                      round(reply.latency_ms, 3), None, None, req.request_hash, False,
                      reply.raw if self.policy.keep_response_body else None, req.keep)


def _miss_message(req: Request, cache: ResponseCache) -> str:
    why = "" if req.cacheable else (
        "; it is not deterministic (no temperature 0 and no seed), so a read-write run stores it only with "
        "run.cache_nondeterministic = true")
    return (f"not in the response cache {cache.path} (run.cache = \"replay\" sends nothing): this exact request "
            f"(model, messages, request fields) was never recorded, or it changed since. Record it with "
            f"--cache read-write{why}")


def error_result(req: Request, kind: str, message: str, *, attempts: int, level: int | None = None,
                 model: str | None = None, charged: float = 0.0, output: str | None = None) -> Result:
    return Result(req.id, "error", output, None, None, model or None, None, level, attempts, None, None, None, None,
                  charged or None, "provider" if charged else None, None, kind, message, req.request_hash,
                  False, None, req.keep)
