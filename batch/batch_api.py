"""Provider Batch APIs: submit rows at the batch price, poll, read every line back once -- one interface, two APIs.

::

    client = client_for("openrouter")          # or "openai"
    info = await client.submit(session, endpoint, model, [(custom_id, body_bytes), ...], tag)
    info = await client.get(session, endpoint, info.id)          # until info.terminal
    async for line in client.results(session, endpoint, info):   # LineResult: reply or error, cost
        ...

``endpoint`` is batch's chat ``Endpoint`` (``{base_url}/chat/completions``);
batches live at ``{base_url}/batches`` (and OpenAI's files at
``{base_url}/files``). ``lines`` are chat-completions bodies as JSON bytes; the
client sets or removes ``model`` as each API wants. A caller chunks rows by
``client.limits``; ``submit`` refuses more with ``BatchLimitError``.

What the caller must handle, by exception class (batch/errors.py and
batch/batch_wire.py):

- ``SubmitUnknownError``: the submission may have been accepted. Never send its
  lines again; ``find`` the batch (and keep its rows held until found or
  given up on).
- ``FallbackError`` kind ``no_batch_endpoint`` / ``no_batch_api``: this model
  (or this provider) cannot use the batch lane; send the rows online.
- ``FatalError`` (401/402/403), ``RateLimited`` (429), ``TransientError`` and
  ``RejectedError`` as online.

Per API: batch/batch_openrouter.py (inline batches, no cancel, heuristic
find) and batch/batch_openai.py (files, cancel, find by metadata tag). Which
reading of each open question of WIRE-BATCH.md is taken is in those modules'
docstrings and in batch/batch_lines.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import aiohttp

from batch.batch_http import Http
from batch.batch_lines import LineResult, ResultLines
from batch.batch_openai import OpenAIBatches
from batch.batch_openrouter import OpenRouterBatches
from batch.batch_wire import (API_NAMES, BATCH_CANCELLED, BATCH_EXPIRED, BATCH_NOT_FOUND, CLOCK_SKEW_SECONDS,
                              NO_BATCH_API, NO_BATCH_ENDPOINT, STATUSES, SUBMIT_UNKNOWN, TERMINAL, BatchInfo,
                              BatchLimitError, BatchUsage, Limits, RequestCounts, SubmitUnknownError, batch_failure)
from batch.provider import Endpoint

__all__ = [
    "API_NAMES", "BATCH_CANCELLED", "BATCH_EXPIRED", "BATCH_NOT_FOUND", "CLOCK_SKEW_SECONDS", "NO_BATCH_API",
    "NO_BATCH_ENDPOINT", "STATUSES", "SUBMIT_UNKNOWN", "TERMINAL", "BatchClient", "BatchInfo", "BatchLimitError",
    "BatchUsage", "Http", "LineResult", "Limits", "OpenAIBatches", "OpenRouterBatches", "RequestCounts",
    "ResultLines", "SubmitUnknownError", "batch_failure", "client_for",
]


class BatchClient(Protocol):
    """What both clients do; every call takes the run's session and the provider's endpoint."""

    api: str
    limits: Limits

    async def submit(self, session: aiohttp.ClientSession, endpoint: Endpoint, model: str,
                     lines: Sequence[tuple[str, bytes]], tag: str, *,
                     options: Mapping[str, Any] | None = None) -> BatchInfo:
        """Send one batch, exactly once; SubmitUnknownError when the outcome is unknown."""
        ...

    async def get(self, session: aiohttp.ClientSession, endpoint: Endpoint, batch_id: str) -> BatchInfo:
        """The batch as the provider describes it now."""
        ...

    def results(self, session: aiohttp.ClientSession, endpoint: Endpoint, info: BatchInfo, *,
                model: str | None = None) -> ResultLines:
        """Every line of a terminal batch, each custom_id once (ValueError before it is terminal)."""
        ...

    async def cancel(self, session: aiohttp.ClientSession, endpoint: Endpoint, batch_id: str) -> bool:
        """Ask the provider to cancel; False when it cannot (no endpoint, already terminal)."""
        ...

    async def find(self, session: aiohttp.ClientSession, endpoint: Endpoint, *, model: str, tag: str,
                   created_after: float, total: int) -> list[BatchInfo]:
        """Batches that may be one submitted without its id recorded (see each API's find)."""
        ...


def client_for(api: str, *, http: Http | None = None, limits: Limits | None = None,
               page_size: int = 1000) -> BatchClient:
    """The client for ``api`` ("openrouter" or "openai"). ``limits`` replaces the API's own (a provider
    that lowered them; tests); ``page_size`` is OpenRouter's /results page (1..1000)."""
    if api == "openrouter":
        return OpenRouterBatches(http, limits or OpenRouterBatches.default_limits, page_size)
    if api == "openai":
        return OpenAIBatches(http, limits or OpenAIBatches.default_limits)
    raise ValueError(f"unknown batch API {api!r}; expected one of {', '.join(API_NAMES)}")
