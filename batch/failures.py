"""What a failed response means: the ProviderError class that decides what happens next, and how long
the provider asked us to wait.

The one translation point from HTTP statuses and error bodies (OpenAI's
string codes, OpenRouter's integer codes with ``metadata`` and
``availability``) to the error tree of batch/errors.py. Waits are read in
this order, as the providers document them (WIRE.md 2.3, 2.4):

1. ``retry-after-ms``, ``Retry-After`` (seconds or an HTTP date),
   OpenRouter's ``availability.retry_after``;
2. for a 429 only: the message's "Please try again in 1.574s";
3. for a 429 only: the reset of the budget that was exhausted
   (``x-ratelimit-remaining-X`` at 0). ``reset`` is the time until the
   limit *fully* resets, so it is the last resort, never preferred.

A 5xx never takes its wait from rate-limit headers. A 429 that says a single
request is larger than the whole token limit ("Request too large") can never
succeed at that model: it falls back and never slows the model down. OpenAI's
flex refusal (429 ``flex_unavailable``, not billed) falls back to the next
model of the chain, which may be the same model at the standard tier.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from batch.errors import FallbackError, FatalError, ProviderError, RateLimited, RejectedError, TransientError

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_LIMIT_RE = re.compile(r"\bLimit:? (\d+)")
_TRY_AGAIN_RE = re.compile(r"try again in (\d+(?:\.\d+)?)(ms|s)", re.I)
_CONTEXT_WORDS = ("context length", "context_length", "maximum context", "too many tokens", "context window")
_FILTER_WORDS = ("content_filter", "content_policy", "moderation", "flagged", "safety")
_GONE = ("model_not_found", "model_deprecated")


@dataclass(frozen=True, slots=True)
class RateInfo:
    """What x-ratelimit-* headers said; None where a header was absent."""

    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    reset_requests: float | None = None  # seconds until the limit fully resets
    reset_tokens: float | None = None
    limit_requests: float | None = None
    limit_tokens: float | None = None


def classify(status: int, body: bytes | dict[str, Any], headers: Mapping[str, str], model: str) -> ProviderError:
    """Translate a failed response into the error class that decides what happens next."""
    err = _error_object(body)
    code = err.get("code")
    given = err.get("metadata")
    meta: dict[str, Any] = given if isinstance(given, dict) else {}
    etype = str(meta.get("error_type") or err.get("type") or "")
    message = str(err.get("message") or "")
    if status == 200 and isinstance(code, int) and code >= 400:
        status = code  # OpenRouter's error object inside a 200 carries the real status
    avail = err.get("availability") if isinstance(err.get("availability"), dict) else None
    words = f"{code} {etype} {message}".lower()
    kw: dict[str, Any] = {"model": model, "status": status,
                          "retry_after": retry_after(headers, err, message, limited=status == 429)}
    detail = message or f"HTTP {status}"
    if "insufficient_quota" in words or "quota" in etype:
        return FatalError(detail, kind="quota_exceeded", **kw)
    if "flex_unavailable" in words:
        return FallbackError(detail, kind="flex_unavailable", **kw)
    if avail is not None and avail.get("retryable") is False:
        return FallbackError(detail, kind="model_not_found" if avail.get("code") in _GONE else "model_unavailable",
                             **kw)
    if status == 429:
        if "request too large" in words:
            return FallbackError(detail, kind="request_too_large", **kw)
        return _rate_limited(detail, words, etype, headers, message, kw, avail)
    return _by_status(status, words, detail, kw)


def _error_object(body: bytes | dict[str, Any]) -> dict[str, Any]:
    data: Any = body
    if isinstance(body, (bytes, bytearray)):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = {}
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return err
    text = str(err) if err else (bytes(body[:200]).decode("utf-8", "replace") if isinstance(body, (bytes, bytearray))
                                 else "")
    return {"message": text}


def _by_status(status: int, words: str, detail: str, kw: dict[str, Any]) -> ProviderError:
    if status in (401, 402) or (status == 403 and not any(w in words for w in _FILTER_WORDS)):
        kind = {401: "auth", 402: "payment_required", 403: "forbidden"}[status]
        return FatalError(detail, kind=kind, **kw)
    if any(w in words for w in _CONTEXT_WORDS):
        return FallbackError(detail, kind="context_length", **kw)
    if any(w in words for w in _FILTER_WORDS):
        return FallbackError(detail, kind="content_filter", **kw)
    if status == 404 or any(w in words for w in _GONE) or "no endpoints found" in words:
        return FallbackError(detail, kind="model_not_found", **kw)
    if status in (408, 504):
        return TransientError(detail, kind="timeout", **kw)
    if status == 409 or status >= 500 or status == 200:
        return TransientError(detail, kind="upstream_error" if status == 200 else "server_error", **kw)
    return RejectedError(detail, kind="bad_request", **kw)


def _rate_limited(detail: str, words: str, etype: str, headers: Mapping[str, str], message: str,
                  kw: dict[str, Any], avail: Mapping[str, Any] | None) -> RateLimited:
    """A 429 with what it says about the limit: which budget, its size if stated, and whether it is
    evidence that *our* rate reached a limit (not an upstream's scattered refusal)."""
    e = RateLimited(detail, **kw)
    e.scope = etype if etype in ("requests", "tokens") else (
        "tokens" if "token" in words else "requests" if "request" in words else None)
    info = rate_info(headers, always=True)
    assert info is not None
    e.limit_requests = info.limit_requests
    e.limit_tokens = info.limit_tokens
    if e.limit_requests is None and (v := headers.get("x-ratelimit-limit")) is not None:
        try:  # OpenRouter's platform limit, sent only on its own 429s
            e.limit_requests = float(v)
        except ValueError:
            pass
    if (m := _LIMIT_RE.search(message)) and e.limit_requests is None and e.limit_tokens is None:
        stated = float(m.group(1))
        if "tpm" in words or "tokens per min" in words:
            e.limit_tokens = stated
        elif "rpm" in words or "requests per min" in words:
            e.limit_requests = stated
    exhausted = 0 in (info.remaining_requests, info.remaining_tokens) or headers.get("x-ratelimit-remaining") == "0"
    e.evidence = bool(e.limit_requests or e.limit_tokens or exhausted or etype in ("requests", "tokens")
                      or "rate limit reached" in words)
    if avail is not None and avail.get("code") == "capacity_exhausted":
        e.capacity = True  # OpenRouter: the providers of this model are full, not our rate
        e.evidence = False
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


def retry_after(headers: Mapping[str, str], err: Mapping[str, Any], message: str, *,
                limited: bool = False) -> float | None:
    """How long the provider asked us to wait, in the documented order (see the module docstring)."""
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
    if not limited:
        return None  # a 5xx takes no wait from rate-limit headers
    if m := _TRY_AGAIN_RE.search(message):
        return float(m.group(1)) / (1000 if m.group(2).lower() == "ms" else 1)
    info = rate_info(headers, always=True)
    assert info is not None
    for remaining, reset in ((info.remaining_requests, info.reset_requests),
                             (info.remaining_tokens, info.reset_tokens)):
        if remaining is not None and remaining <= 0 and reset is not None:
            return reset
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
