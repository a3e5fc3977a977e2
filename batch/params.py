"""The chat-completions parameters a job's ``[request]`` may set, and the check that catches typos.

``[request]`` keys are fields of the body sent with every row. A misspelt one
(``temprature = 0``) would be sent as is: the provider ignores or refuses it,
and since the request is then not deterministic the response cache silently
stores nothing. So every key must be a documented parameter:

- OpenAI's (WIRE.md §2; the names of openai-python's
  ``completion_create_params``), which OpenRouter accepts too;
- OpenRouter's additions (WIRE.md §1.2 and its API reference ``ChatRequest``).

Anything else goes in ``[request.extra]``, whose keys are sent as they are:
a provider-specific field is then a deliberate choice, never a typo. A key of
OpenRouter's on a job that sends to OpenAI is a warning (OpenAI refuses
parameters it does not know), not an error: a proxy may take it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

EXTRA = "extra"  # [request.extra]: provider-specific fields, sent as they are
RESERVED = ("model", "messages", "stream")  # batch sets these itself

OPENAI_PARAMS = frozenset({
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "prompt_cache_retention", "reasoning_effort", "response_format",
    "safety_identifier", "seed", "service_tier", "stop", "store", "stream_options", "temperature",
    "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
})
OPENROUTER_PARAMS = frozenset({
    "models", "route", "provider", "plugins", "transforms", "usage", "top_k", "repetition_penalty", "min_p",
    "top_a", "reasoning", "include_reasoning", "debug",
})
KNOWN_PARAMS = OPENAI_PARAMS | OPENROUTER_PARAMS


def request_problems(request: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for every ``[request]`` key that cannot be sent: reserved, unknown, or a bad extra table."""
    problems: list[tuple[str, str]] = []
    for key in RESERVED:
        if key in request:
            problems.append((key, "set by batch; choose models in [[models]] and prompts in [input]"))
    for key in request:
        if key in KNOWN_PARAMS or key in RESERVED or key == EXTRA:
            continue
        close = difflib.get_close_matches(key, sorted(KNOWN_PARAMS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        problems.append((key, f"not a chat-completions parameter of OpenAI or OpenRouter; {hint}A field only "
                         f"your provider takes goes in [request.{EXTRA}], which is sent as it is"))
    extra = request.get(EXTRA, {})
    if not isinstance(extra, dict):
        problems.append((EXTRA, f"expected a table: [request.{EXTRA}] with the fields to send as they are"))
        return problems
    for key in extra:
        if key in RESERVED:
            problems.append((f"{EXTRA}.{key}", "set by batch; choose models in [[models]] and prompts in [input]"))
        elif key in request:
            problems.append((f"{EXTRA}.{key}", "also set in [request]; keep one of them"))
    return problems


def request_body(request: Mapping[str, Any]) -> dict[str, Any]:
    """The fields sent with every row: ``[request]`` with ``[request.extra]`` merged in (it is no field)."""
    body = {k: v for k, v in request.items() if k != EXTRA}
    extra = request.get(EXTRA)
    if isinstance(extra, dict):
        body.update(extra)
    return body


def provider_warnings(request: Mapping[str, Any], openai_models: Sequence[str]) -> list[str]:
    """OpenRouter-only keys on a job that sends to OpenAI itself: OpenAI answers 400 to parameters it does
    not know. A warning, not an error: ``[request.extra]`` says the user means it."""
    if not openai_models:
        return []
    keys = sorted(k for k in request if k in OPENROUTER_PARAMS and k not in OPENAI_PARAMS)
    return [f"request.{k}: an OpenRouter parameter that OpenAI does not document, and {', '.join(openai_models)} "
            f"{'goes' if len(openai_models) == 1 else 'go'} to OpenAI, which may refuse the request (400); "
            f"move it to [request.{EXTRA}] if your endpoint takes it" for k in keys]
