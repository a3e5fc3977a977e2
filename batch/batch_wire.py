"""What both provider Batch APIs share: the values the client returns, its errors and kinds, line bodies.

batch/batch_openrouter.py and batch/batch_openai.py speak the two APIs
(WIRE-BATCH A and B) through batch/batch_http.py; batch/batch_lines.py reads
result lines; this module holds the values they have in common, and
batch/batch_api.py is the facade callers import.

Kinds of its own, beside those of ``provider.classify``:

- ``no_batch_endpoint`` (FallbackError): the model cannot use a Batch API (a
  submission refused naming the model or the batch endpoint, open question 2;
  or a batch that failed validation for its model, ``batch_failure``): its rows
  go online.
- ``no_batch_api`` (FallbackError): the route itself is missing (a non-JSON
  404/405, e.g. a beta path that is gone, open question 1).
- ``batch_not_found`` (RejectedError): an id the provider no longer knows
  (deleted, or past the 30-day retention).
- ``batch_expired`` / ``batch_cancelled`` (TransientError): a line that never
  ran because its batch expired or was cancelled; it may be sent again.
- ``submit_unknown`` (``SubmitUnknownError``): see its docstring.

A BatchInfo tolerates missing fields, nulls and statuses it does not know
(read as ``in_progress``, and flagged).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from batch.errors import BatchError, FallbackError, ProviderError, RateLimited, RejectedError, redact
from batch.provider import Endpoint, _money

API_NAMES = ("openrouter", "openai")
CHAT_PATH = "/v1/chat/completions"
STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# US spellings of the same statuses (Anthropic and some SDKs write "canceled").
_SPELLINGS = {"canceled": "cancelled", "canceling": "cancelling", "in-progress": "in_progress"}
# A caller's clock and the provider's differ; find() windows should start this much earlier.
CLOCK_SKEW_SECONDS = 300

NO_BATCH_ENDPOINT = "no_batch_endpoint"
NO_BATCH_API = "no_batch_api"
BATCH_NOT_FOUND = "batch_not_found"
BATCH_EXPIRED = "batch_expired"
BATCH_CANCELLED = "batch_cancelled"
SUBMIT_UNKNOWN = "submit_unknown"
_NO_MODEL_WORDS = ("model_not_found", "model_deprecated", "retired", "does not exist", "no endpoints found")
NO_ENDPOINT_RE = re.compile(r"batch endpoint|:batch\b|not (?:available|supported) (?:for|in|via) batch|"
                             r"batch(?:es)? (?:is|are) not (?:available|supported)", re.I)


class SubmitUnknownError(ProviderError):
    """A submission was sent and may have been accepted, but no answer says so.

    Never resubmit its lines: look the batch up with ``find`` (OpenAI by tag,
    OpenRouter by model, size and time). Not a TransientError on purpose, so a
    generic retry ladder cannot send it twice. ``file_id`` is the uploaded
    OpenAI input file, when there is one.
    """

    kind = SUBMIT_UNKNOWN
    file_id: str | None = None


class BatchLimitError(BatchError, ValueError):
    """``submit`` was given more lines or bytes than the API takes in one batch (the caller chunks)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The most one batch may hold; a caller chunks its rows by these."""

    max_lines: int
    max_bytes: int


@dataclass(frozen=True, slots=True)
class RequestCounts:
    total: int
    completed: int
    failed: int  # OpenAI and OpenRouter count expired lines here too


@dataclass(frozen=True, slots=True)
class BatchUsage:
    """Batch-level usage when the provider reports it (OpenAI: tokens only; OpenRouter: tokens and cost)."""

    prompt_tokens: int | None
    completion_tokens: int | None
    cost: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchInfo:
    """One batch as the provider last described it; every field but ``api``, ``id`` and the status may be None.

    ``status`` is one of ``STATUSES``; a status the client does not know reads as
    ``in_progress`` (keep polling) with ``known_status`` False and the provider's
    word in ``provider_status``.
    """

    api: str
    id: str
    status: str
    provider_status: str
    known_status: bool = True
    model: str | None = None
    created_at: int | None = None
    expires_at: int | None = None
    finished_at: int | None = None  # when it became terminal
    request_counts: RequestCounts | None = None
    provider: str | None = None  # OpenRouter: the upstream provider the batch runs on
    usage: BatchUsage | None = None
    error: str | None = None  # why it failed (OpenAI errors.data[], OpenRouter error.message)
    error_code: str | None = None  # the first code, when the provider gives one (token_limit_exceeded)
    tag: str | None = None  # OpenAI: metadata.tag as submitted
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def normalise_status(value: Any) -> tuple[str, str, bool]:
    """(status, as the provider said it, known): an unknown or missing status reads as in_progress."""
    said = value if isinstance(value, str) else ""
    status = _SPELLINGS.get(said.strip().lower(), said.strip().lower())
    if status in STATUSES:
        return status, said, True
    return "in_progress", said, False


def api_base(endpoint: Endpoint) -> str:
    """``{base_url}`` of an endpoint whose url is ``{base_url}/chat/completions``."""
    return endpoint.url.rstrip("/").removesuffix("/chat/completions")


def as_mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def as_text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def as_int(value: Any) -> int | None:
    """A count or timestamp: an int, a whole float or a digit string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return value if isinstance(value, int) else None


def as_time(value: Any) -> int | None:
    """Unix seconds from Unix seconds (int, float or digits) or ISO-8601; None when unreadable."""
    if isinstance(value, float) and value == value and abs(value) < 1e12:
        return int(value)
    if (n := as_int(value)) is not None:
        return n
    if isinstance(value, str):
        try:
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
        except ValueError:
            return None
    return None


def same_model(said: str | None, model: str) -> bool:
    """Whether a batch's model is ``model``; ``x`` and ``x:batch`` are the same (open question 2)."""
    return said is None or said.removesuffix(":batch") == model.removesuffix(":batch")


def batch_failure(info: BatchInfo) -> ProviderError | None:
    """Why a ``failed`` batch failed, as the error class that decides what happens to its rows; else None.

    - ``batch_token_limit`` (RateLimited): OpenAI's enqueued-token cap; submit again later.
    - ``no_batch_endpoint`` (FallbackError): the model cannot be batched (retired, unknown, no batch
      endpoint); its rows go online.
    - ``batch_failed`` (RejectedError): anything else (a line the provider refused to validate).
    """
    if info.status != "failed":
        return None
    message = info.error or "the batch failed validation"
    code = (info.error_code or "").lower()
    model = info.model or ""
    words = f"{code} {message}".lower()
    if code == "token_limit_exceeded" or "enqueued token limit" in words:
        return RateLimited(message, model=model, kind="batch_token_limit")
    if NO_ENDPOINT_RE.search(message) or any(w in words for w in _NO_MODEL_WORDS):
        return FallbackError(message, model=model, kind=NO_BATCH_ENDPOINT)
    return RejectedError(message, model=model, kind="batch_failed")


def as_money(value: Any) -> float | None:
    """A charge in USD (a finite number or a string of one), as batch/provider.py reads usage.cost."""
    return _money(value)


def request_counts(value: Any) -> RequestCounts | None:
    counts = as_mapping(value)
    if not counts:
        return None
    return RequestCounts(*(as_int(counts.get(k)) or 0 for k in ("total", "completed", "failed")))


def check_lines(lines: Sequence[tuple[str, bytes]], limits: Limits) -> None:
    """Refuse what no batch may hold: no lines, too many, an empty or repeated custom_id."""
    if not lines:
        raise ValueError("a batch needs at least one line")
    if len(lines) > limits.max_lines:
        raise BatchLimitError(f"{len(lines):,} lines; a batch takes at most {limits.max_lines:,}: "
                              "submit them in several batches")
    seen: set[str] = set()
    for custom_id, _ in lines:
        if not isinstance(custom_id, str) or not custom_id:
            raise ValueError(f"custom_id must be a non-empty string, not {custom_id!r}")
        if custom_id in seen:
            raise ValueError(f"custom_id {custom_id!r} appears twice; it must be unique within a batch")
        seen.add(custom_id)


def _object_body(custom_id: str, body: bytes) -> bytes:
    stripped = body.strip()
    if not stripped.startswith(b"{"):
        raise ValueError(f"line {custom_id!r}: the body must be a JSON object")
    return stripped


def without_model(custom_id: str, body: bytes) -> bytes:
    """``body`` without a ``model`` key; untouched (not decoded) when it has none, the common case."""
    body = _object_body(custom_id, body)
    if b'"model"' not in body:
        return body
    data = orjson.loads(body)
    data.pop("model", None)
    return orjson.dumps(data)


def with_model(custom_id: str, body: bytes, model: str) -> bytes:
    """``body`` with ``"model": model`` (replacing any other); spliced in front when it has none."""
    body = _object_body(custom_id, body)
    if b'"model"' in body:
        data = orjson.loads(body)
        data["model"] = model
        return orjson.dumps(data)
    rest = body[1:].lstrip()
    return b'{"model":' + orjson.dumps(model) + (b"" if rest.startswith(b"}") else b",") + rest


def scrub(text: str | None, endpoint: Endpoint) -> str | None:
    """Provider text bound for a BatchInfo or a record, without the key."""
    return None if text is None else redact(text, endpoint.secret)
