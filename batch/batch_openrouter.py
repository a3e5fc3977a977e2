"""OpenRouter's inline Batch API (WIRE-BATCH A): submit, get, results, find; there is no cancel.

Batches live at ``{base_url}/batches`` (``/api/v1`` by default). What the
client does where the sources are unclear (WIRE-BATCH "Open questions"):

1. Beta path: only ``{base_url}/batches`` is used; point ``base_url`` at
   ``/api/beta`` to use the beta. A missing route is a FallbackError of kind
   ``no_batch_api``.
2. ``:batch`` slug or base slug: the model is sent as configured. A submission
   refused with 400/404/422 naming the model or the batch endpoint is a
   FallbackError of kind ``no_batch_endpoint``; a batch that later *fails*
   for its model says the same through ``batch_failure``.
3. Inline results: the paged ``/results`` endpoint is preferred for every
   terminal status (stable pages, bounded memory); only when it is missing
   are the inline ``results`` of ``GET /batches/{id}`` read, whenever present
   (only ``completed`` in the beta, any terminal status now). When neither
   exists the lines cannot be read and ``ResultLines.source`` says "none".
4. Cancel: no endpoint is documented, so ``cancel`` sends nothing and returns
   False; the ``cancelling``/``cancelled`` statuses are still understood.
5/6. Line error and cost shapes: see batch/batch_lines.py.
10. Limits: ``submit`` refuses more than 5,000 lines or 200 MB before sending;
   the provider's own refusal (413 or 400) is a RejectedError.

The submission is built from the line bodies as received (JSON bytes, spliced,
not decoded) with ``requests`` serialized last: the body is parsed as a stream,
so ``endpoint`` and ``model`` must come first (the wire contract). ``model`` is
removed from every line body, because the batch model applies to all lines and
a line naming another spelling of it (base slug vs ``:batch``) is refused.
OpenRouter has no metadata, so the ``tag`` is not sent; ``find`` matches by
model, size and time instead (a heuristic: see ``find``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from batch.batch_http import Http, json_object
from batch.batch_lines import ResultLines
from batch.batch_wire import (BATCH_NOT_FOUND, CHAT_PATH, NO_BATCH_API, BatchInfo, BatchLimitError, BatchUsage, Limits,
                              SubmitUnknownError, api_base, as_int, as_mapping, as_money, as_text, as_time,
                              check_lines, normalise_status, request_counts, same_model, scrub, without_model)
from batch.errors import ProviderError, TransientError
from batch.provider import Endpoint

LIMITS = Limits(max_lines=5_000, max_bytes=200_000_000)
MAX_PAGE = 1_000  # the most /results gives per page
MAX_LIST_PAGES = 50  # find() reads at most 50 x 100 batches back
_RESERVED = frozenset({"endpoint", "model", "requests"})


class OpenRouterBatches:
    """The client for OpenRouter's batches; see ``batch.batch_api.BatchClient`` for the contract.

    >>> client = OpenRouterBatches(Http(timeout=60), page_size=1000)
    """

    api = "openrouter"
    default_limits = LIMITS

    def __init__(self, http: Http | None = None, limits: Limits = LIMITS, page_size: int = MAX_PAGE) -> None:
        if not 1 <= page_size <= MAX_PAGE:
            raise ValueError(f"page_size must be 1..{MAX_PAGE}, not {page_size}")
        self.http = http or Http()
        self.limits = limits
        self.page_size = page_size

    def submission(self, model: str, lines: Sequence[tuple[str, bytes]],
                   options: Mapping[str, Any] | None = None) -> bytes:
        """The POST body: fields first, ``requests`` last, line bodies spliced without ``model``."""
        if _RESERVED & set(options or {}):
            raise ValueError(f"options may not set {', '.join(sorted(_RESERVED & set(options or {})))}")
        check_lines(lines, self.limits)
        head = orjson.dumps({"endpoint": CHAT_PATH, "model": model, "completion_window": "24h", **(options or {})})
        parts = [head[:-1], b',"requests":[']
        for n, (custom_id, body) in enumerate(lines):
            parts += [b',' if n else b'', b'{"custom_id":', orjson.dumps(custom_id), b',"body":',
                      without_model(custom_id, body), b'}']
        parts.append(b']}')
        data = b"".join(parts)
        if len(data) > self.limits.max_bytes:
            raise BatchLimitError(f"the submission is {len(data):,} bytes; an OpenRouter batch takes at most "
                                  f"{self.limits.max_bytes:,}: submit fewer lines per batch")
        return data

    async def submit(self, session: aiohttp.ClientSession, endpoint: Endpoint, model: str,
                     lines: Sequence[tuple[str, bytes]], tag: str, *,
                     options: Mapping[str, Any] | None = None) -> BatchInfo:
        """Send one batch, once. ``tag`` is not sent (no metadata here); ``options`` adds top-level fields
        such as ``provider`` or ``callback_url`` (serialized before ``requests``)."""
        data = self.submission(model, lines, options)
        url = api_base(endpoint) + "/batches"
        raw = await self.http.send(session, endpoint, "POST", url, op="submit", data=data, model=model,
                                   size=len(data))
        try:
            return openrouter_info(json_object(raw, url, model), endpoint)
        except TransientError:  # accepted (2xx) but no readable id: it exists, find() will show it
            raise SubmitUnknownError(f"the submission was accepted but its answer is unreadable: {raw[:120]!r}",
                                     model=model) from None

    async def get(self, session: aiohttp.ClientSession, endpoint: Endpoint, batch_id: str) -> BatchInfo:
        url = f"{api_base(endpoint)}/batches/{quote(batch_id, safe='')}"
        return openrouter_info(await self.http.read_json(session, endpoint, url, op="get"), endpoint)

    def results(self, session: aiohttp.ClientSession, endpoint: Endpoint, info: BatchInfo, *,
                model: str | None = None) -> ResultLines:
        """Every line of a terminal batch, each custom_id once (paged, else inline)."""
        if not info.terminal:
            raise ValueError(f"batch {info.id} is {info.status}: its results are read once it is terminal")
        return ResultLines(lambda lines: self._envelopes(session, endpoint, info, lines),
                           model or info.model or "", endpoint.secret)

    async def _envelopes(self, session: aiohttp.ClientSession, endpoint: Endpoint, info: BatchInfo,
                         lines: ResultLines) -> AsyncGenerator[Any, None]:
        url = f"{api_base(endpoint)}/batches/{quote(info.id, safe='')}"
        try:
            page = await self.http.read_json(session, endpoint, url + "/results", op="results",
                                             params={"limit": self.page_size})
        except ProviderError as exc:
            if exc.kind not in (NO_BATCH_API, BATCH_NOT_FOUND):  # a missing route may also say "not found"
                raise
            inline = (await self.http.read_json(session, endpoint, url, op="get")).get("results")
            if isinstance(inline, list):
                lines.source = "inline"
                for envelope in inline:
                    yield envelope
            return
        lines.source = "paged"
        async for envelope in self._pages(session, endpoint, url + "/results", page):
            yield envelope

    async def _pages(self, session: aiohttp.ClientSession, endpoint: Endpoint, url: str,
                     page: Mapping[str, Any]) -> AsyncGenerator[Any, None]:
        """The lines of ``page`` and of every page after it, following ``next_cursor``."""
        cursors: set[str] = set()
        while True:
            data = page.get("data")
            for envelope in data if isinstance(data, list) else ():
                yield envelope
            cursor = as_text(page.get("next_cursor"))
            if page.get("has_more") is False or cursor is None:
                return  # has_more without a cursor leaves nothing to follow: the caller sees missing ids
            if cursor in cursors:
                raise TransientError(f"{url} gave cursor {cursor[:40]!r} twice", kind="bad_response")
            cursors.add(cursor)
            page = await self.http.read_json(session, endpoint, url, op="results",
                                             params={"limit": self.page_size, "cursor": cursor})

    async def cancel(self, session: aiohttp.ClientSession, endpoint: Endpoint, batch_id: str) -> bool:
        """OpenRouter documents no cancel endpoint (open question 4): nothing is sent; False."""
        return False

    async def find(self, session: aiohttp.ClientSession, endpoint: Endpoint, *, model: str, tag: str,
                   created_after: float, total: int) -> list[BatchInfo]:
        """Batches that may be the one a crashed run submitted without recording its id: a heuristic.

        Without metadata, a batch is a candidate when its model (``x`` or ``x:batch``) and
        ``request_counts.total`` match and it was created after ``created_after`` (pass the record's
        creation time minus ``CLOCK_SKEW_SECONDS``). Several candidates are possible (another run of
        the same shape, or another client of the key): the caller must hold the rows for *every*
        candidate it does not already know, and once they are terminal keep only the lines whose
        custom_ids are its own. Newest first; at most ``MAX_LIST_PAGES`` pages of 100 are read.
        """
        url = api_base(endpoint) + "/batches"
        found: list[BatchInfo] = []
        after: str | None = None
        for _ in range(MAX_LIST_PAGES):
            params: dict[str, Any] = {"limit": 100, "created_after": int(created_after)}
            if after is not None:
                params["after"] = after
            page = await self.http.read_json(session, endpoint, url, op="list", params=params)
            listed = [openrouter_info(d, endpoint) for d in _objects(page.get("data"))]
            found += [b for b in listed if _candidate(b, model, total, created_after)]
            oldest = listed[-1].created_at if listed else None
            if not listed or page.get("has_more") is not True or (oldest is not None and oldest < created_after):
                break  # the last test: a server that ignored created_after is read back only this far
            after = as_text(page.get("last_id")) or listed[-1].id
        return found


def _candidate(info: BatchInfo, model: str, total: int, created_after: float) -> bool:
    counts = info.request_counts
    return (same_model(info.model, model) and (counts is None or counts.total == total)
            and (info.created_at is None or info.created_at >= created_after))


def _objects(value: Any) -> list[Mapping[str, Any]]:
    return [d for d in value if isinstance(d, dict) and as_text(d.get("id"))] if isinstance(value, list) else []


def openrouter_info(data: Mapping[str, Any], endpoint: Endpoint) -> BatchInfo:
    """A batch object (WIRE-BATCH A3), tolerating missing fields, nulls and unknown statuses."""
    batch_id = as_text(data.get("id"))
    if batch_id is None:
        raise TransientError(f"a batch object without an id: {orjson.dumps(data)[:120]!r}", kind="bad_response")
    status, said, known = normalise_status(data.get("status"))
    error = data.get("error")
    usage = as_mapping(data.get("usage"))
    return BatchInfo(
        api="openrouter", id=batch_id, status=status, provider_status=said, known_status=known,
        model=as_text(data.get("model")), created_at=as_time(data.get("created_at")),
        expires_at=as_time(data.get("expires_at")), finished_at=as_time(data.get("finalized_at")),
        request_counts=request_counts(data.get("request_counts")), provider=as_text(data.get("provider")),
        usage=BatchUsage(as_int(usage.get("prompt_tokens")), as_int(usage.get("completion_tokens")),
                         as_money(usage.get("cost"))) if usage else None,
        error=scrub(as_text(as_mapping(error).get("message")) or as_text(error), endpoint),
        error_code=as_text(as_mapping(error).get("code")) or as_text(as_mapping(error).get("type")),
    )
