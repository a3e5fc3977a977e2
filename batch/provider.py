"""Stage 5: one HTTP call to an OpenAI-compatible endpoint -> ``Reply`` or ``ProviderError``.

This is the only module that sees aiohttp exceptions and HTTP statuses:
``classify`` turns a status and body into the ProviderError subclass whose
class tells the router what to do, and ``send`` maps transport failures
(timeouts, resets, truncated bodies) into ``TransientError``. API keys live
only in ``Endpoint.headers``, which no repr, log line or error shows.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from batch.failures import RateInfo, classify, rate_info
from batch.errors import (
    FallbackError,
    JobError,
    ProviderError,
    TransientError,
)

USER_AGENT = "batch/0.1 (+https://github.com/batch-runner/batch)"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one provider's requests go. ``headers`` carry the key: never printed."""

    name: str
    url: str
    headers: Mapping[str, str] = field(repr=False)
    secret: str | None = field(default=None, repr=False)  # the key, only to scrub it from what providers say


def missing_key(provider: str, api_key_env: str | None) -> str | None:
    """Why a provider cannot be sent to for want of its key, or None (it has one, or needs none)."""
    if not api_key_env or os.environ.get(api_key_env, "").strip():
        return None
    return (f"provider {provider!r}: environment variable {api_key_env} is not set; export your API key there "
            "(keys are never read from the job file)")


def make_endpoint(name: str, base_url: str, api_key_env: str | None, extra: Mapping[str, str], *,
                  require_key: bool = True) -> Endpoint:
    """Read the key from the environment now, once; raise JobError if it is missing.

    ``require_key=False`` (cache replay: nothing will be sent) accepts a missing key.
    """
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **extra}
    if api_key_env:
        key = os.environ.get(api_key_env, "").strip()
        if require_key and (problem := missing_key(name, api_key_env)):
            raise JobError(problem)
        if key:
            headers["Authorization"] = f"Bearer {key}"
    return Endpoint(name=name, url=base_url.rstrip("/") + "/chat/completions", headers=headers,
                    secret=key if api_key_env and key else None)


@dataclass(frozen=True, slots=True)
class Reply:
    text: str
    finish_reason: str
    model: str
    provider: str | None
    prompt_tokens: int
    completion_tokens: int
    cost: float | None  # as charged by the provider, when it says
    cached_tokens: int | None
    reasoning_tokens: int | None
    latency_ms: float
    rate: RateInfo | None
    raw: bytes  # the response body as received: for the cache and output.raw_response


def open_session(concurrency: int) -> aiohttp.ClientSession:
    """One session per run; the pool allows one connection per worker."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                 raise_for_status=False)


async def send(session: aiohttp.ClientSession, endpoint: Endpoint, model: str, body: bytes,
               timeout: float) -> Reply:
    """POST one body; the deadline covers connecting, headers and the whole body.

    Every ProviderError leaves here without the key, whatever the provider repeated."""
    try:
        return await _post(session, endpoint, model, body, timeout)
    except ProviderError as exc:
        exc.redact(endpoint.secret)
        raise


async def _post(session: aiohttp.ClientSession, endpoint: Endpoint, model: str, body: bytes,
                timeout: float) -> Reply:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with session.post(endpoint.url, data=body, headers=endpoint.headers) as resp:
                raw = await resp.read()
                status = resp.status
                headers = resp.headers
    except TimeoutError:
        raise TransientError(f"no complete answer within {timeout:g}s", model=model, kind="timeout") from None
    except aiohttp.ClientPayloadError as exc:
        raise TransientError(f"truncated body: {exc}", model=model, kind="bad_response") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise TransientError(f"{type(exc).__name__}: {exc}", model=model, kind="connection") from None
    latency_ms = (time.perf_counter() - started) * 1000
    if status != 200:
        raise classify(status, raw, headers, model)
    return reply_from_body(raw, model, latency_ms, headers)


def reply_from_body(raw: bytes, model: str, latency_ms: float = 0.0,
                    headers: Mapping[str, str] | None = None) -> Reply:
    """Parse a chat-completions body (from the wire, or from the cache)."""
    try:
        data = orjson.loads(raw)
        return _parse(data, model, latency_ms, headers or {}, raw)
    except ProviderError:
        raise
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise TransientError(f"malformed reply: {raw[:120]!r}", model=model, kind="bad_response") from None


def _parse(data: dict[str, Any], model: str, latency_ms: float, headers: Mapping[str, str], raw: bytes) -> Reply:
    """The one place replies are read: every field is checked and coerced to the type its column has,
    so an odd reply (numbers as strings, content as parts) is an answer, or a ``bad_response`` naming
    the odd value, and never a value that fails later when a part is written."""
    if "error" in data and data["error"]:
        raise classify(200, data, headers, model)
    choice = data["choices"][0]
    usage = _mapping(data.get("usage"))
    finish = _string(choice.get("finish_reason")) or "stop"
    if finish == "error" or choice.get("error"):
        err = _mapping(choice.get("error"))
        exc = TransientError(f"error inside HTTP 200: {err.get('message', err)}", model=model, status=200,
                             kind="upstream_error")
        exc.charged_usd = _money(usage.get("cost"))  # partial answers are billed (OpenRouter)
        exc.charged_tokens = (_count(usage.get("prompt_tokens")) or 0, _count(usage.get("completion_tokens")) or 0)
        raise exc
    if finish == "content_filter":
        raise FallbackError("the answer was withheld by a content filter", model=model, kind="content_filter")
    text = _content(_mapping(choice.get("message")).get("content"), model)
    return Reply(
        text=text,
        finish_reason=finish,
        model=_string(data.get("model")) or model,
        provider=_string(data.get("provider")),
        prompt_tokens=_count(usage.get("prompt_tokens")) or 0,
        completion_tokens=_count(usage.get("completion_tokens")) or 0,
        cost=_money(usage.get("cost")),
        cached_tokens=_count(_mapping(usage.get("prompt_tokens_details")).get("cached_tokens")),
        reasoning_tokens=_count(_mapping(usage.get("completion_tokens_details")).get("reasoning_tokens")),
        latency_ms=latency_ms,
        rate=rate_info(headers),
        raw=raw,
    )


def _content(value: Any, model: str) -> str:
    """The answer text: a string, or a list of content parts whose text parts are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type", "text") == "text"]
        texts = [t for t in parts if isinstance(t, str)]
        if texts and len(texts) == len(parts):
            return "".join(texts)
    what = "no message content" if value is None else f"message content of type {type(value).__name__}: " \
        f"{orjson.dumps(value, default=str)[:120].decode(errors='replace')}"
    raise TransientError(f"reply has {what}", model=model, status=200, kind="bad_response")


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


_INT64 = 2**63


def _count(value: Any) -> int | None:
    """A token count: an int, or a number or digit string that is one; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    return value if isinstance(value, int) and 0 <= value < _INT64 else None


def _money(value: Any) -> float | None:
    """A charge in USD: a finite number, or a string of one; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        amount = float(value)
    except ValueError:
        return None
    return amount if math.isfinite(amount) else None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One entry of ``GET {base_url}/models`` (OpenRouter's shape): prices in USD per token."""

    context_length: int | None
    price_input: float | None
    price_output: float | None
    supported_parameters: tuple[str, ...] | None = None  # OpenRouter: e.g. "response_format", "structured_outputs"


async def fetch_models(session: aiohttp.ClientSession, endpoint: Endpoint, timeout: float = 30) -> dict[str, ModelInfo]:
    """The provider's model list, for live prices and context windows before a run."""
    url = endpoint.url.removesuffix("/chat/completions") + "/models"
    try:
        async with asyncio.timeout(timeout):
            async with session.get(url, headers=endpoint.headers) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    error = classify(resp.status, raw, resp.headers, "")
                    error.redact(endpoint.secret)
                    raise error
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise TransientError(f"cannot list models at {url}: {exc}", kind="connection") from None
    try:
        entries = orjson.loads(raw)["data"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise TransientError(f"{url} did not return a model list", kind="bad_response") from None
    models = {}
    for e in entries:
        if not isinstance(e, dict) or "id" not in e:
            continue
        pricing = e.get("pricing") or {}
        params = e.get("supported_parameters")
        models[e["id"]] = ModelInfo(
            context_length=e.get("context_length"),
            price_input=_price(pricing.get("prompt")),
            price_output=_price(pricing.get("completion")),
            supported_parameters=tuple(str(x) for x in params) if isinstance(params, list) else None,
        )
    return models


def _price(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
