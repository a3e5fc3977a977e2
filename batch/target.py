"""``Target``: one model of a row's chain, with everything needed to call it and to account for it.

A target is a (provider, model, service tier): the same model may appear twice
in a chain, at the ``flex`` tier first and at the standard tier after it.
Once a provider says a model does not exist or was retired, ``gone`` holds
why, and no further row is sent to it in this run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from batch.breaker import Breaker
from batch.limits import ModelLimiter
from batch.provider import Endpoint, Reply
from batch.stats import ModelStats
from batch.steer import Steering


@dataclass(slots=True)
class Target:
    """One model of the chain, with everything needed to call it."""

    level: int
    model: str
    provider: str
    prefix: bytes  # b'{"model":"x",' (plus OpenRouter's "models" list, response_format, service_tier)
    server_fallback: tuple[str, ...]  # the later models of OpenRouter's "models" list (run.server_fallback)
    cache_salt: bytes  # the provider's configured base URL and a NUL: part of every cache key
    endpoint: Endpoint
    limiter: ModelLimiter
    steer: Steering
    breaker: Breaker
    stats: ModelStats
    price_in: float | None  # USD per token
    price_out: float | None
    service_tier: str | None = None  # "flex": a refusal is not a rate limit but a reason to fall back
    gone: str | None = None  # why the provider says this model cannot answer at all (retired, not found)

    @property
    def label(self) -> str:
        return self.stats.label

    def worst_cost(self, prompt_tokens: int, max_tokens: int) -> float:
        if self.price_in is None or self.price_out is None:
            return 0.0  # unknown prices: refused at load when there is a cap (job.py)
        return prompt_tokens * self.price_in + max_tokens * self.price_out

    def cost_of(self, reply: Reply) -> tuple[float | None, str | None]:
        if reply.cost is not None:
            return reply.cost, "provider"
        if self.price_in is not None and self.price_out is not None:
            return reply.prompt_tokens * self.price_in + reply.completion_tokens * self.price_out, "price_table"
        return None, None

    def token_limit(self) -> float | None:
        """The most tokens one request may count: the provider's stated or the job's per-minute limit."""
        return self.steer.ceiling["tokens"]


def model_prefix(model: str, server_fallback: Sequence[str] = (),
                 response_format: Mapping[str, Any] | None = None, service_tier: str | None = None) -> bytes:
    """The start of a body for ``model``: OpenRouter's ``models`` list (``server_fallback``), the model's
    structured-output request ([output_format]) and its ``service_tier``, when set."""
    prefix = b'{"model":' + orjson.dumps(model) + b","
    if server_fallback:
        prefix += b'"models":' + orjson.dumps([model, *server_fallback]) + b","
    if response_format is not None:
        prefix += b'"response_format":' + orjson.dumps(response_format) + b","
    if service_tier is not None:
        prefix += b'"service_tier":' + orjson.dumps(service_tier) + b","
    return prefix
