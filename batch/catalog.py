"""Built-in facts: providers batch knows by name, and models' windows and prices.

Sources are in ../shared/WIRE.md. Prices are USD per million tokens; a job
overrides them per model with ``price_input_per_million`` and
``price_output_per_million``, and a provider-reported charge (OpenRouter's
``usage.cost``) is preferred over either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SIM_BASE_URL = "sim://in-process"  # replaced by the real loopback URL at run time

BUILTIN_PROVIDERS: dict[str, dict[str, Any]] = {
    "openrouter": {"base_url": "https://openrouter.ai/api/v1", "api_key_env": "OPENROUTER_API_KEY",
                   "batch_api": "openrouter"},
    "openai": {"base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY", "batch_api": "openai"},
    "sim": {"base_url": SIM_BASE_URL, "api_key_env": None, "batch_api": "openai"},
}


@dataclass(frozen=True, slots=True)
class ModelFacts:
    context_window: int
    price_input_per_million: float
    price_output_per_million: float
    response_formats: tuple[str, ...] = ("json_schema", "json_object")  # what response_format accepts
    retired_on: str | None = None  # the provider shut the model down that day: it answers 404 since
    successor: str | None = None  # what the provider named in its place


# gpt-3.5-turbo has JSON mode but not structured outputs (json_schema is a 400 there). OpenAI shut it down
# on 2026-10-23, naming gpt-4.1-mini as the substitute (WIRE.md 0.1); its facts stay for old outputs and
# for the simulator, where it is the canonical retired model.
_GPT35 = ModelFacts(context_window=16_385, price_input_per_million=0.50, price_output_per_million=1.50,
                    response_formats=("json_object",), retired_on="2026-10-23", successor="openai/gpt-4.1-mini")
# Context windows and prices from OpenAI's model pages (as mirrored by gateways, read 2026-12).
_GPT41_MINI = ModelFacts(context_window=1_047_576, price_input_per_million=0.40, price_output_per_million=1.60)
_GPT4O_MINI = ModelFacts(context_window=128_000, price_input_per_million=0.15, price_output_per_million=0.60)

KNOWN_MODELS: dict[str, ModelFacts] = {
    "openai/gpt-3.5-turbo": _GPT35,
    "gpt-3.5-turbo": _GPT35,
    "gpt-3.5-turbo-0125": _GPT35,
    "openai/gpt-4.1-mini": _GPT41_MINI,
    "gpt-4.1-mini": _GPT41_MINI,
    "openai/gpt-4o-mini": _GPT4O_MINI,
    "gpt-4o-mini": _GPT4O_MINI,
}


def facts_for(model: str) -> ModelFacts | None:
    """What batch knows of a model without asking the network, or None."""
    return KNOWN_MODELS.get(model)


FLEX_PRICE_FACTOR = 0.5  # flex is billed at Batch API rates (WIRE-BATCH.md C1)
BATCH_PRICE_FACTOR = FLEX_PRICE_FACTOR  # batch lines are billed at half the chat price (WIRE-BATCH.md A7, B4)


def prices_for(model: str, price_in: float | None, price_out: float | None,
               service_tier: str | None = None) -> tuple[float | None, float | None]:
    """USD per million (input, output) tokens: the job's override, else the built-in table (at half for
    the flex tier), else None."""
    facts = facts_for(model)
    factor = FLEX_PRICE_FACTOR if service_tier == "flex" else 1.0
    if price_in is None and facts is not None:
        price_in = facts.price_input_per_million * factor
    if price_out is None and facts is not None:
        price_out = facts.price_output_per_million * factor
    return price_in, price_out


# Faults the simulator can inject (batch/sim.py): what it does instead of answering.
SIM_FAULTS = (
    "429",                 # rate limited, with Retry-After
    "500", "502", "503", "504",
    "hang",                # never answers (until hang_seconds)
    "reset",               # closes the connection without a response
    "truncated",           # HTTP 200 whose JSON body is cut in half
    "stall_body",          # sends headers and part of the body, then stalls
    "error_in_200",        # HTTP 200 with a top-level error object (OpenRouter)
    "finish_error",        # HTTP 200, finish_reason "error" with choices[0].error, partly billed
    "insufficient_quota",  # 429 that is not a rate limit: never succeeds on retry
    "401", "402",
    "content_filter",      # HTTP 200 with finish_reason "content_filter"
)
