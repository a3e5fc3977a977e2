"""OpenAI's Files + Batch API (WIRE-BATCH B): upload, create, get, output/error files, cancel, find.

A submission is two calls: ``POST {base_url}/files`` (multipart,
``purpose=batch``, a JSONL file of ``{custom_id, method, url, body}`` lines)
and ``POST {base_url}/batches`` with ``completion_window: "24h"`` and
``metadata: {"tag": tag}``, so a batch whose create answer was lost is found
again by its tag (``find``). The upload is safe to repeat (at worst an unused
file is left behind, which expires after 30 days); the create call is not,
and any doubt about it raises ``SubmitUnknownError`` carrying the file id.

Every line body gets ``model`` set to the batch model (OpenAI wants it in each
line, and one model per file): spliced in front of the JSON bytes when the
body has none, so bodies are not decoded again.

Results are the output file and the error file (``GET /files/{id}/content``,
streamed line by line and retried from where a broken download stopped: files
never change). The error file holds both documented failure shapes and the
``batch_expired`` lines (batch/batch_lines.py). Lines a cancel kept from
running are in neither file: a caller finds them missing and may send them
again. OpenAI reports tokens, not cost, per line: ``LineResult.cost`` is None
and the caller prices tokens at the batch price.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from batch.batch_http import MAX_WAIT_SECONDS, Http, json_object
from batch.batch_lines import ResultLines
from batch.batch_wire import (BATCH_NOT_FOUND, CHAT_PATH, BatchInfo, BatchLimitError, BatchUsage, Limits,
                              SubmitUnknownError, api_base, as_int, as_mapping, as_text, as_time, check_lines,
                              normalise_status, request_counts, scrub, with_model)
from batch.errors import RejectedError, TransientError
from batch.provider import Endpoint

LIMITS = Limits(max_lines=50_000, max_bytes=200_000_000)
TAG_KEY = "tag"  # the metadata key that carries the caller's tag
MAX_LIST_PAGES = 50  # find() reads at most 50 x 100 batches back
_FINISHED = ("completed_at", "failed_at", "expired_at", "cancelled_at")
_RESERVED = frozenset({"input_file_id", "endpoint", "completion_window"})


class OpenAIBatches:
    """The client for OpenAI's batches; see ``batch.batch_api.BatchClient`` for the contract.

    >>> client = OpenAIBatches(Http(timeout=60))
    """

    api = "openai"
    default_limits = LIMITS

    def __init__(self, http: Http | None = None, limits: Limits = LIMITS) -> None:
        self.http = http or Http()
        self.limits = limits

    def input_file(self, model: str, lines: Sequence[tuple[str, bytes]]) -> bytes:
        """The JSONL input file: one ``{custom_id, method, url, body}`` line per row, ``model`` in each body."""
        check_lines(lines, self.limits)
        method = b',"method":"POST","url":' + orjson.dumps(CHAT_PATH) + b',"body":'
        data = b"".join(b'{"custom_id":' + orjson.dumps(custom_id) + method + with_model(custom_id, body, model)
                        + b"}\n" for custom_id, body in lines)
        if len(data) > self.limits.max_bytes:
            raise BatchLimitError(f"the input file is {len(data):,} bytes; an OpenAI batch takes at most "
                                  f"{self.limits.max_bytes:,}: submit fewer lines per batch")
        return data

    async def submit(self, session: aiohttp.ClientSession, endpoint: Endpoint, model: str,
                     lines: Sequence[tuple[str, bytes]], tag: str, *,
                     options: Mapping[str, Any] | None = None) -> BatchInfo:
        """Upload the lines, then create the batch once; ``options`` adds create fields such as
        ``output_expires_after`` (its ``metadata`` is merged with the tag)."""
        if _RESERVED & set(options or {}):
            raise ValueError(f"options may not set {', '.join(sorted(_RESERVED & set(options or {})))}")
        content = self.input_file(model, lines)
        file_id = await self._upload(session, endpoint, content, tag, model)
        metadata = {**as_mapping((options or {}).get("metadata")), TAG_KEY: tag}
        body = orjson.dumps({**(options or {}), "input_file_id": file_id, "endpoint": CHAT_PATH,
                             "completion_window": "24h", "metadata": metadata})
        url = api_base(endpoint) + "/batches"
        try:
            raw = await self.http.send(session, endpoint, "POST", url, op="submit", data=body, model=model)
            return openai_info(json_object(raw, url, model), endpoint)
        except SubmitUnknownError as exc:
            exc.file_id = file_id
            raise
        except TransientError:  # a 2xx without a readable batch: it exists, find() will show it
            unknown = SubmitUnknownError("the batch was created but its answer is unreadable", model=model)
            unknown.file_id = file_id
            raise unknown from None

    async def _upload(self, session: aiohttp.ClientSession, endpoint: Endpoint, content: bytes, tag: str,
                      model: str) -> str:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", content, filename=f"{tag}.jsonl", content_type="application/jsonl")
        url = api_base(endpoint) + "/files"
        raw = await self.http.send(session, endpoint, "POST", url, op="upload", data=form, json_body=False,
                                   model=model, size=len(content))
        file_id = as_text(json_object(raw, url, model).get("id"))
        if file_id is None:
            raise TransientError(f"{url} answered without a file id: {raw[:120]!r}", model=model,
                                 kind="bad_response")
        return file_id

    async def get(self, session: aiohttp.ClientSession, endpoint: Endpoint, batch_id: str) -> BatchInfo:
        url = f"{api_base(endpoint)}/batches/{quote(batch_id, safe='')}"
        return openai_info(await self.http.read_json(session, endpoint, url, op="get"), endpoint)

    def results(self, session: aiohttp.ClientSession, endpoint: Endpoint, info: BatchInfo, *,
                model: str | None = None) -> ResultLines:
        """Every line of the output file, then of the error file, each custom_id once."""
        if not info.terminal:
            raise ValueError(f"batch {info.id} is {info.status}: its results are read once it is terminal")
        return ResultLines(lambda lines: self._envelopes(session, endpoint, info, lines),
                           model or info.model or "", endpoint.secret)

    async def _envelopes(self, session: aiohttp.ClientSession, endpoint: Endpoint, info: BatchInfo,
                         lines: ResultLines) -> AsyncGenerator[Any, None]:
        lines.source = "files"  # a terminal batch without files ran no line
        for file_id in (info.output_file_id, info.error_file_id):
            if file_id is not None:
                async for envelope in self._file(session, endpoint, file_id, lines.model):
                    yield envelope

    async def _file(self, session: aiohttp.ClientSession, endpoint: Endpoint, file_id: str,
                    model: str) -> AsyncGenerator[Any, None]:
        """The file's lines as JSON (None for an unreadable one); a broken download resumes after the
        lines already given, since the file cannot change."""
        url = f"{api_base(endpoint)}/files/{quote(file_id, safe='')}/content"
        given = 0
        for attempt in range(1, self.http.attempts + 1):
            seen = 0
            try:
                async for raw in self.http.lines(session, endpoint, url, op="content", model=model):
                    seen += 1
                    if seen > given:
                        given = seen
                        yield _loads(raw)
                return
            except TransientError as exc:
                if attempt >= self.http.attempts:
                    raise
                await asyncio.sleep(min(exc.retry_after or self.http.backoff * 2 ** (attempt - 1), MAX_WAIT_SECONDS))

    async def cancel(self, session: aiohttp.ClientSession, endpoint: Endpoint, batch_id: str) -> bool:
        """Ask OpenAI to cancel: True when it took the request (the batch drains in ``cancelling`` for up
        to 10 minutes, then ``cancelled`` with partial results); False when it was already terminal."""
        url = f"{api_base(endpoint)}/batches/{quote(batch_id, safe='')}/cancel"
        try:
            await self.http.send(session, endpoint, "POST", url, op="cancel")
        except RejectedError as exc:
            if exc.kind == BATCH_NOT_FOUND:
                raise
            return False  # "Cannot cancel a batch with status 'completed'"
        return True

    async def find(self, session: aiohttp.ClientSession, endpoint: Endpoint, *, model: str, tag: str,
                   created_after: float, total: int) -> list[BatchInfo]:
        """The batches created with ``tag`` in their metadata (exact: the tag is the caller's random token).

        Lists newest first and stops at batches older than ``created_after`` (pass the record's
        creation time minus ``CLOCK_SKEW_SECONDS``) or after ``MAX_LIST_PAGES`` pages of 100.
        ``model`` and ``total`` are not needed here (total reads 0 until validated)."""
        url = api_base(endpoint) + "/batches"
        found: list[BatchInfo] = []
        after: str | None = None
        for _ in range(MAX_LIST_PAGES):
            params: dict[str, Any] = {"limit": 100} if after is None else {"limit": 100, "after": after}
            page = await self.http.read_json(session, endpoint, url, op="list", params=params)
            data = page.get("data")
            listed = [openai_info(d, endpoint) for d in data if isinstance(d, dict) and as_text(d.get("id"))] \
                if isinstance(data, list) else []
            found += [b for b in listed if b.tag == tag]
            oldest = listed[-1].created_at if listed else None
            if not listed or page.get("has_more") is not True or (oldest is not None and oldest < created_after):
                break
            after = as_text(page.get("last_id")) or listed[-1].id
        return found


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def openai_info(data: Mapping[str, Any], endpoint: Endpoint) -> BatchInfo:
    """A batch object (WIRE-BATCH B2), tolerating missing fields, nulls and unknown statuses."""
    batch_id = as_text(data.get("id"))
    if batch_id is None:
        raise TransientError(f"a batch object without an id: {orjson.dumps(data)[:120]!r}", kind="bad_response")
    status, said, known = normalise_status(data.get("status"))
    errors = as_mapping(data.get("errors")).get("data")
    errors = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
    usage = as_mapping(data.get("usage"))
    finished = next((t for k in _FINISHED if (t := as_time(data.get(k))) is not None), None)
    return BatchInfo(
        api="openai", id=batch_id, status=status, provider_status=said, known_status=known,
        model=as_text(data.get("model")), created_at=as_time(data.get("created_at")),
        expires_at=as_time(data.get("expires_at")), finished_at=finished,
        request_counts=request_counts(data.get("request_counts")),
        usage=BatchUsage(as_int(usage.get("input_tokens")), as_int(usage.get("output_tokens")), None)
        if usage else None,
        error=scrub(_error_text(errors), endpoint), error_code=as_text(errors[0].get("code")) if errors else None,
        tag=as_text(as_mapping(data.get("metadata")).get(TAG_KEY)), input_file_id=as_text(data.get("input_file_id")),
        output_file_id=as_text(data.get("output_file_id")), error_file_id=as_text(data.get("error_file_id")),
    )


def _error_text(errors: list[Mapping[str, Any]]) -> str | None:
    """``errors.data[]`` as one line: the first three, and how many more."""
    if not errors:
        return None
    said = [f"{e.get('code') or 'error'}: {e.get('message') or ''}"
            + (f" (line {e['line']})" if as_int(e.get("line")) is not None else "") for e in errors[:3]]
    more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
    return "; ".join(said) + more
