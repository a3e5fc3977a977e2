"""A terminal batch's result lines -> ``LineResult``s: each custom_id once, parsed exactly like an online reply.

Both APIs put one envelope per line (WIRE-BATCH A5, B3)::

    {"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error": {...} | null}

What is read, and how:

- ``response.status_code`` 200: ``body`` goes through ``provider.reply_from_body``
  with the batch's model, so a batch answer is parsed, coerced and checked as
  an online one is (an error or ``finish_reason: "error"`` inside it, a content
  filter, odd shapes). Its ``usage.cost`` is the line's billed cost when the
  provider gives one (OpenRouter, open question 6); otherwise ``cost`` is None
  and the caller prices the tokens at the batch price.
- ``response.status_code`` 4xx/5xx with ``body.error`` (OpenAI's first error
  shape, tolerated on OpenRouter too): ``provider.classify`` on status and body.
- ``response: null`` with ``error``: ``{code, message}`` (OpenAI's second
  shape) or ``{type, message, param, error_type?}`` (OpenRouter; open question
  5, so both keys are read). ``batch_expired`` becomes a TransientError of kind
  ``batch_expired``, ``batch_cancelled`` one of kind ``batch_cancelled``: the
  line never ran, the caller may send it again. Other errors carry no status,
  so one is inferred from their code/type (rate limit 429, server/provider
  500, anything else 400) and classified as an online failure would be.

A custom_id seen again is skipped and counted (``duplicates``: possible in
principle on OpenRouter); a line without a custom_id cannot be attributed and
is counted as ``malformed``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import orjson

from batch.batch_wire import BATCH_CANCELLED, BATCH_EXPIRED, as_int, as_mapping
from batch.errors import ProviderError, TransientError
from batch.failures import classify
from batch.provider import Reply, reply_from_body

_EXPIRED = frozenset({"batch_expired", "expired"})
_CANCELLED = frozenset({"batch_cancelled", "batch_canceled", "cancelled", "canceled"})
_SERVER_WORDS = ("server", "provider_error", "upstream", "internal", "timeout", "unavailable", "overloaded")

Envelopes = Callable[["ResultLines"], AsyncGenerator[Any, None]]


@dataclass(frozen=True, slots=True)
class LineResult:
    """One line's outcome: exactly one of ``reply`` and ``error`` is set."""

    custom_id: str
    reply: Reply | None
    error: ProviderError | None
    cost: float | None  # billed USD when the provider says (OpenRouter's per-line usage.cost)

    @property
    def ok(self) -> bool:
        return self.reply is not None


def line_result(custom_id: str, envelope: Mapping[str, Any], model: str) -> LineResult:
    """What one envelope says about its line (the module docstring lists the shapes)."""
    response = as_mapping(envelope.get("response"))
    error = envelope.get("error")
    status = as_int(response.get("status_code"))
    body = response.get("body")
    if status is not None and 200 <= status < 300 and isinstance(body, dict):
        try:
            reply = reply_from_body(orjson.dumps(body), model)
        except ProviderError as exc:  # an error inside the 200, exactly as online
            return LineResult(custom_id, None, exc, exc.charged_usd)
        return LineResult(custom_id, reply, None, reply.cost)
    if status is not None and status >= 400:
        failed = body if isinstance(body, dict) else str(body or "").encode()
        return LineResult(custom_id, None, classify(status, failed, {}, model), None)
    if isinstance(error, (dict, str)) and error:
        return LineResult(custom_id, None, line_error(error, model), None)
    return LineResult(custom_id, None, TransientError(
        f"result line has neither an answer nor an error: {orjson.dumps(envelope)[:120]!r}", model=model,
        kind="bad_response"), None)


def line_error(error: Mapping[str, Any] | str, model: str) -> ProviderError:
    """The ProviderError for an envelope's ``error`` object (either API's shape)."""
    err: Mapping[str, Any] = error if isinstance(error, dict) else {"message": str(error)}
    code = str(err.get("code") or err.get("type") or "")
    message = str(err.get("message") or code or "the line failed")
    if code.lower() in _EXPIRED:
        return TransientError(message, model=model, kind=BATCH_EXPIRED)
    if code.lower() in _CANCELLED:
        return TransientError(message, model=model, kind=BATCH_CANCELLED)
    body = {"error": {"message": message, "code": code or None, "type": err.get("type"),
                      "metadata": {"error_type": err.get("error_type")}}}
    return classify(_status_of(err, code), body, {}, model)


def _status_of(err: Mapping[str, Any], code: str) -> int:
    """The HTTP status an error line stands for: stated, else inferred from its words."""
    for key in ("status_code", "status", "code"):
        stated = as_int(err.get(key))
        if stated is not None and 400 <= stated < 600:
            return stated
    words = f"{code} {err.get('type') or ''} {err.get('error_type') or ''}".lower()
    if "rate_limit" in words:
        return 429
    if any(w in words for w in _SERVER_WORDS):
        return 500
    return 400


class ResultLines:
    """Every line of a terminal batch, each custom_id once; read it once with ``async for``.

    >>> lines = client.results(session, endpoint, info)    # doctest: +SKIP
    >>> async for line in lines: ...                       # doctest: +SKIP
    >>> lines.duplicates, lines.source                     # doctest: +SKIP

    After the loop: ``lines`` yielded, ``duplicates`` skipped, ``malformed``
    envelopes without a custom_id (or unreadable), and ``source``: "paged",
    "inline" or "files" -- or "none" when the provider offered no way to read
    this batch's lines (OpenRouter's beta reading of open question 3: no paging
    and no inline results for a batch that did not complete).
    """

    def __init__(self, envelopes: Envelopes, model: str, secret: str | None) -> None:
        self.model = model
        self.lines = 0
        self.duplicates = 0
        self.malformed = 0
        self.source = "none"
        self._envelopes = envelopes
        self._secret = secret
        self._started = False

    def __aiter__(self) -> AsyncIterator[LineResult]:
        if self._started:
            raise RuntimeError("ResultLines is read once; call results() again to reread")
        self._started = True
        return self._run()

    async def _run(self) -> AsyncIterator[LineResult]:
        seen: set[str] = set()  # at most one batch's custom_ids (50,000)
        async with aclosing(self._envelopes(self)) as envelopes:
            async for envelope in envelopes:
                custom_id = envelope.get("custom_id") if isinstance(envelope, dict) else None
                if not isinstance(custom_id, str) or not custom_id:
                    self.malformed += 1
                    continue
                if custom_id in seen:
                    self.duplicates += 1
                    continue
                seen.add(custom_id)
                self.lines += 1
                result = line_result(custom_id, envelope, self.model)
                if result.error is not None:
                    result.error.redact(self._secret)
                yield result
