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
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from batch.errors import (
    FallbackError,
    FatalError,
    JobError,
    ProviderError,
    RateLimited,
    RejectedError,
    TransientError,
)

USER_AGENT = "batch/0.1 (+https://github.com/batch-runner/batch)"
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_LIMIT_RE = re.compile(r"\bLimit:? (\d+)")
_TRY_AGAIN_RE = re.compile(r"try again in (\d+(?:\.\d+)?)(ms|s)", re.I)
_CONTEXT_WORDS = ("context length", "context_length", "maximum context", "too many tokens", "context window")
_FILTER_WORDS = ("content_filter", "content_policy", "moderation", "flagged", "safety")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one provider's requests go. ``headers`` carry the key: never printed."""

    name: str
    url: str
    headers: Mapping[str, str] = field(repr=False)
    secret: str | None = field(default=None, repr=False)  # the key, only to scrub it from what providers say


def make_endpoint(name: str, base_url: str, api_key_env: str | None, extra: Mapping[str, str], *,
                  require_key: bool = True) -> Endpoint:
    """Read the key from the environment now, once; raise JobError if it is missing.

    ``require_key=False`` (cache replay: nothing will be sent) accepts a missing key.
    """
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **extra}
    if api_key_env:
        key = os.environ.get(api_key_env, "").strip()
        if not key and require_key:
            raise JobError(f"provider {name!r}: environment variable {api_key_env} is not set; "
                           f"export your API key there (keys are never read from the job file)")
        if key:
            headers["Authorization"] = f"Bearer {key}"
    return Endpoint(name=name, url=base_url.rstrip("/") + "/chat/completions", headers=headers,
                    secret=key if api_key_env and key else None)


@dataclass(frozen=True, slots=True)
class RateInfo:
    """What x-ratelimit-* headers said; None where a header was absent."""

    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    reset_requests: float | None = None  # seconds
    reset_tokens: float | None = None
    limit_requests: float | None = None
    limit_tokens: float | None = None


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


def classify(status: int, body: bytes | dict[str, Any], headers: Mapping[str, str], model: str) -> ProviderError:
    """Translate a failed response into the error class that decides what happens next."""
    data: Any = body
    if isinstance(body, (bytes, bytearray)):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = {}
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        err = {"message": str(err) if err else (body[:200].decode("utf-8", "replace") if isinstance(body, bytes) else "")}
    code = err.get("code")
    meta = err.get("metadata") or {}
    etype = str(meta.get("error_type") or err.get("type") or "")
    message = str(err.get("message") or "")
    if status == 200 and isinstance(code, int) and code >= 400:
        status = code  # OpenRouter's error object inside a 200 carries the real status
    avail = err.get("availability") if isinstance(err.get("availability"), dict) else None
    words = f"{code} {etype} {message}".lower()
    kw: dict[str, Any] = {"model": model, "status": status, "retry_after": retry_after(headers, err, message)}
    detail = message or f"HTTP {status}"

    if "insufficient_quota" in words or "quota" in etype:
        return FatalError(detail, kind="quota_exceeded", **kw)
    if avail is not None and avail.get("retryable") is False:
        kind = "model_not_found" if avail.get("code") in ("model_not_found", "model_deprecated") else "model_unavailable"
        return FallbackError(detail, kind=kind, **kw)
    if status == 429:
        return _rate_limited(detail, words, headers, message, kw)
    if status in (401, 402) or (status == 403 and not any(w in words for w in _FILTER_WORDS)):
        kind = {401: "auth", 402: "payment_required", 403: "forbidden"}[status]
        return FatalError(detail, kind=kind, **kw)
    if any(w in words for w in _CONTEXT_WORDS):
        return FallbackError(detail, kind="context_length", **kw)
    if any(w in words for w in _FILTER_WORDS):
        return FallbackError(detail, kind="content_filter", **kw)
    if status == 404 or "model_not_found" in words or "model_deprecated" in words:
        return FallbackError(detail, kind="model_not_found", **kw)
    if status in (408, 504):
        return TransientError(detail, kind="timeout", **kw)
    if status == 409 or status >= 500 or status == 200:
        return TransientError(detail, kind="upstream_error" if status == 200 else "server_error", **kw)
    return RejectedError(detail, kind="bad_request", **kw)


def _rate_limited(detail: str, words: str, headers: Mapping[str, str], message: str,
                  kw: dict[str, Any]) -> RateLimited:
    """A 429 with what it says about the limit: which budget, and its size if stated."""
    e = RateLimited(detail, **kw)
    e.scope = "tokens" if "token" in words else "requests" if "request" in words else None
    info = rate_info(headers, always=True)
    assert info is not None
    e.limit_requests = info.limit_requests
    e.limit_tokens = info.limit_tokens
    if e.limit_requests is None and (v := headers.get("x-ratelimit-limit")) is not None:
        try:  # OpenRouter's platform limit, sent only on its 429s
            e.limit_requests = float(v)
        except ValueError:
            pass
    if (m := _LIMIT_RE.search(message)) and e.limit_requests is None and e.limit_tokens is None:
        stated = float(m.group(1))
        if "tpm" in words or "tokens per min" in words:
            e.limit_tokens = stated
        elif "rpm" in words or "requests per min" in words:
            e.limit_requests = stated
    return e


def parse_duration(value: str) -> float | None:
    """Seconds from a Go-style duration (``1s``, ``6m0s``, ``12ms``, ``1.5s``) or a bare number."""
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    parts = _DURATION_RE.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def retry_after(headers: Mapping[str, str], err: Mapping[str, Any], message: str) -> float | None:
    """How long the provider asked us to wait, from the most precise source it gave."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    if (ra := headers.get("retry-after")) is not None:
        try:
            return max(0.0, float(ra))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(ra).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    avail = err.get("availability")
    if isinstance(avail, dict) and isinstance(avail.get("retry_after"), (int, float)):
        return float(avail["retry_after"])
    resets = [r for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
              if h in headers and (r := parse_duration(headers[h])) is not None]
    if resets:
        return max(resets)
    if m := _TRY_AGAIN_RE.search(message):
        return float(m.group(1)) / (1000 if m.group(2).lower() == "ms" else 1)
    return None


def rate_info(headers: Mapping[str, str], *, always: bool = False) -> RateInfo | None:
    """x-ratelimit-* headers of a response, or None when it sent none (the common case)."""
    rr = headers.get("x-ratelimit-remaining-requests")
    rt = headers.get("x-ratelimit-remaining-tokens")
    if rr is None and rt is None and not always:
        return None

    def num(name: str) -> float | None:
        v = headers.get(name)
        try:
            return float(v) if v is not None else None
        except ValueError:
            return None

    def dur(name: str) -> float | None:
        v = headers.get(name)
        return parse_duration(v) if v is not None else None

    return RateInfo(
        remaining_requests=num("x-ratelimit-remaining-requests"),
        remaining_tokens=num("x-ratelimit-remaining-tokens"),
        reset_requests=dur("x-ratelimit-reset-requests"),
        reset_tokens=dur("x-ratelimit-reset-tokens"),
        limit_requests=num("x-ratelimit-limit-requests"),
        limit_tokens=num("x-ratelimit-limit-tokens"),
    )


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
