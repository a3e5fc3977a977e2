"""Answers from the response cache, before anything is sent.

A row is looked up under each model of its chain, in order; a hit is an
``ok`` row with ``cached`` set, no request and zero cost. Read-write looks up
only what it may store (deterministic requests); replay looks up everything
and a miss becomes an ``error`` row of type ``cache_miss``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from batch.answers import Checker
from batch.cache import ResponseCache, cache_key
from batch.errors import ProviderError
from batch.prompts import Request
from batch.provider import reply_from_body
from batch.result import Result, result_row

if TYPE_CHECKING:
    from batch.router import Target


def looks_up(req: Request, cache: ResponseCache) -> bool:
    """Read-write looks up only what it may store; replay looks up everything (it sends nothing)."""
    return req.cacheable or not cache.writable


def from_cache(req: Request, chain: Sequence[Target], cache: ResponseCache, keys: list[bytes], *,
               checker: Checker | None, length_is_failure: bool, keep_body: bool) -> Result | None:
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
        if length_is_failure and reply.finish_reason == "length" and level < final:
            continue
        parsed = None
        if checker is not None:
            parsed, problem = checker.check(reply.text)
            if problem is not None:
                continue  # stored by a job with another output_format: not an answer for this one
        cache.hits += 1
        t.stats.cache_hits += 1
        return result_row(req, attempts=0, reply=reply, provider=t.provider, level=level, parsed=parsed,
                          cost=0.0, cost_source="cache", cached=True, keep_body=keep_body)
    cache.misses += 1
    return None


def first_keys(reqs: Sequence[Request], chain_of: Callable[[Request], Sequence[Target]],
               cache: ResponseCache) -> list[bytes]:
    """The first-choice cache key of every row that will be looked up (for one batched query)."""
    keys = []
    for req in reqs:
        if req.problem is None and looks_up(req, cache):
            t = chain_of(req)[0]
            keys.append(cache_key(t.cache_salt, req.body_for(t.prefix)))
    return keys


def miss_message(req: Request, cache: ResponseCache) -> str:
    why = "" if req.cacheable else (
        "; it is not deterministic (no temperature 0 and no seed), so a read-write run stores it only with "
        "run.cache_nondeterministic = true")
    return (f"not in the response cache {cache.path} (run.cache = \"replay\" sends nothing): this exact request "
            f"(model, messages, request fields) was never recorded, or it changed since. Record it with "
            f"--cache read-write{why}")
