"""Stage 6: a ``Request`` -> a ``Result``: retry, fallback, circuit breakers.

For each model of the row's chain in order, up to ``max_attempts`` attempts:

- ``TransientError`` (timeouts, resets, 5xx, bad bodies): back off with full
  jitter, or exactly as long as the provider asked; then retry.
- ``RateLimited`` (429): the row waits as advised; this does not use up its
  attempts (being throttled is not the row's fault), up to
  ``max_rate_limit_waits``. Only a 429 that is evidence of the model's limit
  pauses and slows the whole model (batch/steer.py).
- ``FallbackError`` / ``RejectedError``: go to the next model at once. A model
  that does not exist or was retired leaves the chain for the rest of the run;
  a flex refusal or a request larger than the model's token limit leaves it
  for this row only.
- ``FatalError`` (bad key, no credits): stop the run; the row gets *no*
  result, so a resume redoes it.

Every wait is capped by ``max_wait_seconds``. A ``Breaker`` per model
(batch/breaker.py) skips a model that keeps failing, then lets one probe
through. Before any row has ever been answered, connection failures are not
the row's: the row retries and the run stops within ``unreachable_seconds``
(batch/pump.py) naming the URL. The request path itself (slow start, budgets,
the cost cap, the HTTP call) is batch/send.py; answers that fail
[output_format] are repaired (batch/repair.py); the cache is looked up first
(batch/lookup.py). This module consumes ProviderErrors; it never raises them.
``RunStopped`` tells the worker to drop the row unrecorded.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

import aiohttp

from batch.answers import Checker
from batch.attempts import AttemptLog
from batch.breaker import NO, PROBE
from batch.budget import Budget
from batch.cache import ResponseCache
from batch.errors import FallbackError, FatalError, ProviderError, RateLimited, RejectedError, TransientError
from batch.lookup import first_keys, from_cache, looks_up, miss_message
from batch.prompts import Request
from batch.provider import Reply
from batch.repair import Repairs
from batch.result import Result, error_result, result_row
from batch.send import ModelClosed, Policy, Row, RunStopped, Sender
from batch.target import Target

__all__ = ["Policy", "Router", "RunStopped", "Target"]


class Router(Sender):
    """Routes rows through the chain (the HTTP side is ``Sender``)."""

    def __init__(self, session: aiohttp.ClientSession, targets: Sequence[Target], policy: Policy,
                 on_fatal: Callable[[FatalError], None], budget: Budget | None = None,
                 on_budget: Callable[[], None] = lambda: None, *, cache: ResponseCache | None = None,
                 row_chains: Mapping[str, Sequence[Target]] | None = None, checker: Checker | None = None,
                 max_repairs: int = 0, log: AttemptLog | None = None,
                 on_gone: Callable[[Target], None] = lambda t: None) -> None:
        super().__init__(session, policy, budget or Budget(None), on_budget, log)
        width = None if policy.fallback else 1
        self.targets = list(targets)[:width]
        # OpenAI Batch lines with their own body.model (body_model = "keep") start at that model
        self.row_chains = {m: list(chain)[:width] for m, chain in (row_chains or {}).items()}
        self.cache = cache
        self.checker = checker
        self.max_repairs = max_repairs
        self.on_fatal = on_fatal
        self.on_gone = on_gone

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
                self.log_cache_hit(req, hit)
                return hit
            if not cache.writable:
                return error_result(req, "cache_miss", miss_message(req, cache), attempts=0)
        row = Row()
        if req.carried[0]:  # billed in the batch lane already (an invalid answer sent back online)
            row.charged, row.billed_prompt, row.billed_completion = req.carried
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
                            charged=row.charged, billed=(row.billed_prompt, row.billed_completion),
                            output=row.invalid_answer if last.kind == "invalid_output" else None)

    def prefetch(self, reqs: Sequence[Request]) -> None:
        """Look up a batch of rows' first-choice cache keys in one go (the reader calls this per batch)."""
        if self.cache is not None and (keys := first_keys(reqs, self._chain, self.cache)):
            self.cache.prefetch(keys)

    def _chain(self, req: Request) -> list[Target]:
        return self.targets if req.model is None else self.row_chains.get(req.model, self.targets)

    async def _attempts(self, req: Request, t: Target, row: Row, last: ProviderError | None, *,
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
            if (skip := self._cannot_take(req, t, last, is_last)) is not None:
                return None, skip
            verdict = t.breaker.allow()
            if verdict == NO:
                if not is_last:
                    return None, last or TransientError("circuit open", model=t.model, kind="circuit_open")
                await asyncio.sleep(min(t.breaker.seconds_to_probe(), p.max_wait))  # nowhere else to go
                continue
            probe = verdict == PROBE
            try:
                reply = await self.send(req, t, body, row, repairs.extra_tokens if repairs else 0, probe)
            except ModelClosed:
                continue  # nothing was sent: ask the breaker (and the chain) again
            except RateLimited as e:
                t.breaker.release(probe)
                last, waits = e, waits + 1
                if (gave_up := await self._rate_limited(req, t, row, e, waits, level, is_last)) is not None:
                    return None, gave_up
                continue
            except TransientError as e:
                last, tries = e, tries + await self._transient(req, t, row, e, tries, level, is_last, probe)
                continue
            except (FallbackError, RejectedError) as e:
                t.breaker.release(probe)
                self._leave_model(t, e, row)
                self.log_attempt(req, t, row, level, _then(True, is_last, ""), e)
                return None, e
            except FatalError as e:
                t.breaker.release(probe)
                self.log_attempt(req, t, row, level, "stopped", e)
                self._fatal(t, e)
            except BaseException:
                t.breaker.release(probe)
                if row.in_flight:  # cut off mid-request by a hard stop
                    self.log_attempt(req, t, row, level, "stopped", outcome="cancelled")
                raise
            t.breaker.success(probe)
            self.answered()
            next_body, invalid = self._answer(req, t, reply, row, repairs, level, is_last)
            if next_body is None:
                return (reply, last) if invalid is None else (None, invalid)
            body = next_body
        return None, last

    def _cannot_take(self, req: Request, t: Target, last: ProviderError | None,
                     is_last: bool) -> ProviderError | None:
        """Why this model cannot take this row now, before anything is sent (None: it can)."""
        self._check_stop()
        if t.gone is not None:
            return FallbackError(t.gone, model=t.model, kind="model_not_found")
        limit = t.token_limit()
        if limit is not None and req.prompt_tokens + (req.max_tokens or self.policy.max_tokens) > limit:
            t.stats.errors["request_too_large"] += 1
            return FallbackError(f"the request counts about {req.prompt_tokens} prompt tokens plus max_tokens, more "
                                 f"than the model's whole limit of {limit:g} tokens per minute", model=t.model,
                                 kind="request_too_large")
        if self.policy.spill_on_rate_limit and not is_last and t.limiter.paused:
            return last or RateLimited("model is paused by its rate limit", model=t.model)
        return None

    async def _rate_limited(self, req: Request, t: Target, row: Row, e: RateLimited, waits: int, level: int,
                            is_last: bool) -> ProviderError | None:
        """A 429. Returns the error to fall back with, or None after waiting (then the row tries again)."""
        p = self.policy
        if t.service_tier == "flex" and e.capacity:  # OpenRouter: no flex capacity now; not our rate
            flex = FallbackError(e.detail, model=t.model, status=429, kind="flex_unavailable")
            self._leave_model(t, flex, row)
            self.log_attempt(req, t, row, level, _then(True, is_last, ""), flex)
            return flex
        t.stats.rate_limited += 1
        self.failures_since_success += 1  # a model that answers only 429s is not answering
        wait = min(e.retry_after if e.retry_after is not None else self._backoff(waits - 1), p.max_wait)
        t.steer.rate_limited(wait, evidence=e.evidence, scope=e.scope, limit_requests=e.limit_requests,
                             limit_tokens=e.limit_tokens)
        gave_up = waits > p.max_rate_limit_waits or (p.spill_on_rate_limit and not is_last)
        self.log_attempt(req, t, row, level, _then(gave_up, is_last, "wait"), e)
        if gave_up:
            t.stats.errors[e.kind] += 1
            return e
        await asyncio.sleep(wait)
        return None

    async def _transient(self, req: Request, t: Target, row: Row, e: TransientError, tries: int, level: int,
                         is_last: bool, probe: bool) -> int:
        """A failure worth retrying: count it and back off. Returns 1, or 0 when it is not the row's
        fault (the endpoint has never answered this run: the pump stops the run instead)."""
        t.breaker.failure(e, probe)
        if self.unreachable(e):
            t.stats.errors[e.kind] += 1  # a failed attempt all the same: stats and the summary count it
            self.log_attempt(req, t, row, level, "retry", e)
            await asyncio.sleep(min(self._backoff(tries), 2.0))
            return 0
        self._failed(t, e, row)
        tries += 1
        self.log_attempt(req, t, row, level, _then(tries >= self.policy.max_attempts, is_last, "retry"), e)
        if tries < self.policy.max_attempts:
            t.stats.retries += 1
            await asyncio.sleep(self._backoff(tries - 1, e.retry_after))
        return 1

    def _answer(self, req: Request, t: Target, reply: Reply, row: Row, repairs: Repairs | None, level: int,
                is_last: bool) -> tuple[bytes | None, ProviderError | None]:
        """An answer: (None, None) to keep it; (body, None) to ask again (repair); (None, error) to fall back."""
        if self.policy.length_is_failure and reply.finish_reason == "length" and not is_last:
            cut = FallbackError("answer cut at max_tokens", model=t.model, kind="truncated")
            self._failed(t, cut, row, reply)
            self.log_attempt(req, t, row, level, "fallback", cut, reply)
            return None, cut
        next_body, invalid = self._judge(t, reply, row, repairs) if repairs is not None else (None, None)
        if next_body is not None:
            self.log_attempt(req, t, row, level, "repair", reply=reply, outcome="invalid_output")
        else:
            self.log_attempt(req, t, row, level, "done" if invalid is None else _then(True, is_last, ""), invalid,
                             reply)
        return next_body, invalid

    def _leave_model(self, t: Target, e: ProviderError, row: Row) -> None:
        """The row leaves this model; a model that does not exist leaves the chain for every row."""
        self._failed(t, e, row)
        if e.kind == "flex_unavailable":
            t.stats.flex_refusals += 1
        if e.kind == "model_not_found" and t.gone is None:
            t.gone = t.stats.gone = f"{t.model} is not available: {e.detail}"
            self.on_gone(t)

    def _fatal(self, t: Target, e: FatalError) -> NoReturn:
        """The key or account is unusable: stop the whole run, leaving this row for the resume."""
        t.stats.errors[e.kind] += 1
        self.stopping = True
        self._opened.set()
        self.on_fatal(e)
        raise RunStopped(str(e)) from None

    def _judge(self, t: Target, reply: Reply, row: Row, repairs: Repairs
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

    def _backoff(self, retry: int, retry_after: float | None = None) -> float:
        """Full jitter, capped; exactly the provider's wish when it stated one (up to max_wait)."""
        if retry_after is not None:
            return min(retry_after, self.policy.max_wait)
        cap = min(self.policy.backoff_max, self.policy.backoff_base * (2 ** retry))
        return random.uniform(0, cap)

    def _ok(self, req: Request, t: Target, reply: Reply, row: Row, level: int, chain: Sequence[Target]) -> Result:
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
                          cost=cost, cost_source=source, keep_body=self.policy.keep_response_body,
                          billed=(row.billed_prompt, row.billed_completion))


def _then(gives_up: bool, is_last: bool, otherwise: str) -> str:
    """What follows a failed attempt: ``otherwise`` (retry, wait) unless the row leaves this model."""
    if not gives_up:
        return otherwise
    return "failed" if is_last else "fallback"

