"""The simulator's Batch API routes, registered by ``Simulator.app()`` through ``add_batch_routes``.

OpenRouter (WIRE-BATCH A), under ``/api/v1`` (and ``/api/beta`` with ``batch_beta_path``)::

    POST   /batches                202 and the batch object; malformed submissions 400 at once
    GET    /batches                newest first, ``results`` null; limit, after, status, created_after/before
    GET    /batches/{id}           ``results`` inline once terminal (``batch_inline_results``)
    GET    /batches/{id}/results   pages of 1..1000 with stable cursors, once terminal (409 before);
                                   absent with ``batch_results_paging=False`` (the beta)
    DELETE /batches/{id}           terminal batches only (409 otherwise); does not cancel

There is no cancel endpoint: like any unknown route, ``POST /batches/{id}/cancel``
answers 404, and ``POST /batches/{id}`` 405.

OpenAI (WIRE-BATCH B), under ``/v1``::

    POST /files                    multipart, purpose=batch; 400 "File is too large." over batch_max_bytes
    GET  /files/{id}, /files/{id}/content
    POST /batches                  200 and the batch object; file problems fail the batch later
    GET  /batches, /batches/{id}
    POST /batches/{id}/cancel      cancelling for batch_cancel_seconds, then cancelled

Every route checks ``api_key`` as the chat endpoint does (401, same body).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from batch.sim_config import SimConfig
from batch.sim_faults import error_response as _error
from batch.sim_batch import TERMINAL, BatchBook, SimBatch
from batch.sim_batch_shapes import (THIRTY_DAYS, create_problem, decode_cursor, encode_cursor, file_object,
                                    openai_batch, openrouter_batch, openrouter_line, openrouter_lines, parse_input,
                                    submission_problem)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHUNK = 1 << 16
# Statuses OpenRouter's list filters on (WIRE-BATCH A6): not finalizing or cancelling.
LIST_FILTERS = ("validating", "in_progress", "completed", "failed", "expired", "cancelled")


def add_batch_routes(app: web.Application, config: SimConfig, book: BatchBook | None = None) -> BatchBook:
    """Serve both Batch APIs from ``app``; returns the book that holds their state (``book`` if given)."""
    book = book if book is not None else BatchBook(config)
    openrouter, openai = OpenRouterBatches(book), OpenAIBatches(book)
    routes = [route for prefix in ("/api/v1", "/api/beta")[: 2 if config.batch_beta_path else 1]
              for route in openrouter.routes(prefix)]
    for method, path, handler in (*routes, *openai.routes()):
        app.router.add_route(method, path, _guarded(config, handler))
    return book


def _guarded(config: SimConfig, handler: Handler) -> Handler:
    """``handler`` behind the chat endpoint's api_key check."""
    async def guarded(request: web.Request) -> web.StreamResponse:
        if config.api_key is not None and request.headers.get("Authorization") != f"Bearer {config.api_key}":
            return _error(401, "No auth credentials found or the key is invalid", 401)
        return await handler(request)
    return guarded


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int | None:
    try:
        value = int(request.query.get(name, default))
    except ValueError:
        return None
    return value if lo <= value <= hi else None


async def _read_bounded(chunks: Callable[[int], Awaitable[bytes]], limit: int) -> bytes | None:
    """Read a body or part up to ``limit`` bytes; None beyond it (without reading the rest)."""
    parts: list[bytes] = []
    size = 0
    while chunk := await chunks(CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _page(book: BatchBook, api: str, batches: list[SimBatch], after: str | None, limit: int
          ) -> tuple[list[SimBatch], bool] | None:
    """Newest first, from the first batch created before ``after`` (whether or not the filters kept it);
    None when ``after`` names no batch of this API."""
    mark = book.batches.get(after) if after is not None else None
    if after is not None and (mark is None or mark.api != api):
        return None
    batches = sorted((b for b in batches if mark is None or b.serial < mark.serial), key=lambda b: b.serial,
                     reverse=True)
    return batches[:limit], len(batches) > limit


def _page_body(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


class OpenRouterBatches:
    """OpenRouter's inline Batch API (WIRE-BATCH A)."""

    def __init__(self, book: BatchBook) -> None:
        self.book = book
        self.config = book.config

    def routes(self, prefix: str) -> Iterable[tuple[str, str, Handler]]:
        p = prefix + "/batches"
        paged = (("GET", p + "/{id}/results", self.results),) if self.config.batch_results_paging else ()
        return (("POST", p, self.submit), ("GET", p, self.list), ("GET", p + "/{id}", self.get),
                ("DELETE", p + "/{id}", self.delete), *paged)

    def _find(self, request: web.Request) -> SimBatch | None:
        b = self.book.batches.get(request.match_info["id"])
        return b if b is not None and b.api == "openrouter" and not b.deleted else None

    async def submit(self, request: web.Request) -> web.StreamResponse:
        # Read as a stream up to the batch limit, not the app's client_max_size; 413 is our reading of
        # the over-200-MB answer (open question 10).
        raw = await _read_bounded(request.content.read, self.config.batch_max_bytes)
        if raw is None:
            return _error(413, f"A batch body may be at most {self.config.batch_max_bytes:,} bytes.", 413)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error(400, "The request body must be JSON.", 400)
        problem = submission_problem(body)
        if problem is not None:
            return _error(400, problem, 400)
        batch = self.book.create("openrouter", body["model"], body["endpoint"], openrouter_lines(body))
        return _json(openrouter_batch(self.config, batch, batch.created_mono, inline=False), status=202)

    async def get(self, request: web.Request) -> web.StreamResponse:
        b = self._find(request)
        if b is None:
            return _error(404, "Batch not found", 404)
        return _json(openrouter_batch(self.config, b, _now(), inline=True))

    async def results(self, request: web.Request) -> web.StreamResponse:
        b = self._find(request)
        if b is None:
            return _error(404, "Batch not found", 404)
        limit = _int_param(request, "limit", 100, 1, 1000)
        if limit is None:
            return _error(400, "'limit' must be an integer from 1 to 1000.", 400)
        now = _now()
        results = b.results(now)
        if results is None:  # undocumented; a client must not mistake "not yet" for "no lines"
            return _error(409, f"Batch {b.id} is {b.status(now)}; results are served once it is terminal.", 409)
        cursor = request.query.get("cursor")
        offset = 0 if cursor is None else decode_cursor(cursor, b.id, len(results))
        if offset is None:
            return _error(400, "Invalid 'cursor'.", 400)
        end = offset + limit
        return _json({"object": "list", "data": [openrouter_line(self.config, b, r) for r in results[offset:end]],
                      "has_more": end < len(results),
                      "next_cursor": encode_cursor(b.id, end) if end < len(results) else None})

    async def list(self, request: web.Request) -> web.StreamResponse:
        limit = _int_param(request, "limit", 20, 1, 100)
        statuses = request.query.getall("status", [])
        lo = _when(request.query.get("created_after"), -math.inf)
        hi = _when(request.query.get("created_before"), math.inf)
        if limit is None or any(s not in LIST_FILTERS for s in statuses) or math.isnan(lo) or math.isnan(hi):
            return _error(400, "Invalid list parameters: limit 1..100, status one of " + ", ".join(LIST_FILTERS)
                          + ", created_after/created_before Unix seconds or ISO-8601.", 400)
        now = _now()
        chosen = [b for b in self.book.batches.values() if b.api == "openrouter" and not b.deleted
                  and (not statuses or b.status(now) in statuses) and lo <= b.created_wall <= hi]
        page = _page(self.book, "openrouter", chosen, request.query.get("after"), limit)
        if page is None:
            return _error(400, "Invalid 'after': no such batch.", 400)
        data = [openrouter_batch(self.config, b, now, inline=False) for b in page[0]]
        return _json(_page_body(data, page[1]))

    async def delete(self, request: web.Request) -> web.StreamResponse:
        b = self._find(request)
        if b is None:
            return _error(404, "Batch not found", 404)
        status = b.status(_now())
        if status not in TERMINAL:
            return _error(409, f"Batch {b.id} is {status}; only a terminal batch can be deleted "
                          "(deleting does not cancel).", 409)
        b.deleted = True  # its lines stay in the counters: billing records are kept
        return _json({"id": b.id, "object": "batch",
                      "deletion": {"openrouter": "deleted", "upstream": {"provider": "Sim", "status": "deleted"}}})


def _when(value: str | None, absent: float) -> float:
    """Unix seconds from Unix seconds or ISO-8601; ``absent`` when not given, NaN when unreadable."""
    if value is None:
        return absent
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return float("nan")


def _now() -> float:
    return time.monotonic()


def _openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return _error(status, message, code, type="invalid_request_error", param=param)


class OpenAIBatches:
    """OpenAI's Files + Batch API (WIRE-BATCH B)."""

    def __init__(self, book: BatchBook) -> None:
        self.book = book
        self.config = book.config

    def routes(self) -> Iterable[tuple[str, str, Handler]]:
        return (("POST", "/v1/files", self.upload), ("GET", "/v1/files/{id}", self.file),
                ("GET", "/v1/files/{id}/content", self.content), ("POST", "/v1/batches", self.create),
                ("GET", "/v1/batches", self.list), ("GET", "/v1/batches/{id}", self.get),
                ("POST", "/v1/batches/{id}/cancel", self.cancel))

    def _find(self, request: web.Request) -> SimBatch | None:
        b = self.book.batches.get(request.match_info["id"])
        return b if b is not None and b.api == "openai" else None

    async def upload(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "multipart/form-data":
            return _openai_error(400, "Uploads must be multipart/form-data.")
        fields: dict[str, str] = {}
        content: bytes | None = None
        filename = "input.jsonl"
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name != "file":
                fields[part.name or ""] = await part.text()
                continue
            filename = part.filename or filename
            # Streamed against the limit, so an oversized upload is refused without holding it.
            content = await _read_bounded(part.read_chunk, self.config.batch_max_bytes)
            if content is None:
                return _openai_error(400, "File is too large.")
        if fields.get("purpose") != "batch":
            return _openai_error(400, "The simulator takes only purpose 'batch'.", "purpose")
        if content is None:
            return _openai_error(400, "Missing required parameter: 'file'.", "file")
        seconds = fields.get("expires_after[seconds]")
        if seconds is not None and not (seconds.isdigit() and 3600 <= int(seconds) <= 2_592_000):
            return _openai_error(400, "'expires_after[seconds]' must be from 3600 to 2592000.",
                                 "expires_after")
        f = self.book.add_file(filename, "batch", content, int(seconds) if seconds else THIRTY_DAYS)
        return _json(file_object(f))

    async def file(self, request: web.Request) -> web.StreamResponse:
        f = self.book.files.get(request.match_info["id"])
        if f is None:
            return _openai_error(404, f"No such File object: {request.match_info['id']}", "id")
        return _json(file_object(f))

    async def content(self, request: web.Request) -> web.StreamResponse:
        f = self.book.files.get(request.match_info["id"])
        if f is None:
            return _openai_error(404, f"No such File object: {request.match_info['id']}", "id")
        return web.Response(body=f.content, content_type="application/octet-stream")

    async def create(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _openai_error(400, "The request body must be JSON.")
        problem = create_problem(body, self.book.files)
        if problem is not None:
            return _openai_error(400, *problem)
        lines, errors, model = parse_input(self.book.files[body["input_file_id"]].content, body["endpoint"])
        expiry = body.get("output_expires_after")
        extra = {"input_file_id": body["input_file_id"], "metadata": body.get("metadata"),
                 "output_expires_after": expiry.get("seconds") if isinstance(expiry, dict) else None}
        batch = self.book.create("openai", model, body["endpoint"], lines, errors, extra)
        return _json(openai_batch(self.book, batch, batch.created_mono))

    async def get(self, request: web.Request) -> web.StreamResponse:
        b = self._find(request)
        if b is None:
            return _openai_error(404, f"No batch found with id '{request.match_info['id']}'.")
        return _json(openai_batch(self.book, b, _now()))

    async def list(self, request: web.Request) -> web.StreamResponse:
        limit = _int_param(request, "limit", 20, 1, 100)
        if limit is None:
            return _openai_error(400, "'limit' must be an integer from 1 to 100.", "limit")
        page = _page(self.book, "openai", [b for b in self.book.batches.values() if b.api == "openai"],
                     request.query.get("after"), limit)
        if page is None:
            return _openai_error(400, "Invalid 'after': no such batch.", "after")
        now = _now()
        return _json(_page_body([openai_batch(self.book, b, now) for b in page[0]], page[1]))

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        b = self._find(request)
        if b is None:
            return _openai_error(404, f"No batch found with id '{request.match_info['id']}'.")
        now = _now()
        status = b.status(now)
        if status in TERMINAL:
            return _openai_error(400, f"Cannot cancel a batch with status '{status}'.")
        self.book.cancel(b, now)
        return _json(openai_batch(self.book, b, now))
