"""The client's one HTTP seam for both Batch APIs: deadlines, retried reads, errors mapped once.

Like batch/provider.py for chat, this is the only place aiohttp exceptions and
HTTP statuses of the Batch APIs are seen: ``http_error`` turns a failed answer
into the ``ProviderError`` whose class tells the caller what to do
(401/402/403 FatalError, 429 RateLimited, 5xx TransientError, 400/404/422
RejectedError or FallbackError, through ``provider.classify``), plus the
batch kinds of batch/batch_wire.py.

A submission whose outcome is unknown -- a timeout or reset after sending, a
5xx or 408 from a gateway, an unreadable 2xx -- raises ``SubmitUnknownError``
(not a TransientError): the provider may have accepted it, so it is looked up
with ``find``, never sent again blindly. A connection refused before anything
was sent is a plain TransientError ("connection"): nothing reached the
provider. Reads (GET) are idempotent and retried a few times here; nothing
else is. No error leaves this module with the API key in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from batch.batch_wire import (BATCH_NOT_FOUND, NO_BATCH_API, NO_BATCH_ENDPOINT, NO_ENDPOINT_RE,
                              SubmitUnknownError)
from batch.errors import FallbackError, ProviderError, RejectedError, TransientError
from batch.failures import classify
from batch.provider import USER_AGENT, Endpoint

MAX_WAIT_SECONDS = 30.0  # the longest a retried read waits, whatever Retry-After says
MIN_BYTES_PER_SECOND = 1_000_000  # the slowest upload a submission's deadline allows for
_ID_OPS = frozenset({"get", "results", "content", "cancel"})  # operations on an id we were given


def http_error(status: int, raw: bytes, headers: Mapping[str, str], *, op: str, model: str = "") -> ProviderError:
    """The ProviderError for a failed answer to ``op`` (submit, upload, get, list, results, content, cancel)."""
    if status in (404, 405) and not _json_error(raw):
        return FallbackError(f"no Batch API route here (HTTP {status})", model=model, status=status, kind=NO_BATCH_API)
    exc = classify(status, raw, headers, model)
    if op in _ID_OPS and status == 404:
        return RejectedError(exc.detail, model=model, status=status, kind=BATCH_NOT_FOUND)
    if op == "submit":
        if status in (400, 404, 422) and (NO_ENDPOINT_RE.search(exc.detail) or exc.kind == "model_not_found"):
            return FallbackError(exc.detail, model=model, status=status, kind=NO_BATCH_ENDPOINT)
        if status >= 500 or status == 408:  # a gateway's failure says nothing about whether it was stored
            return SubmitUnknownError(exc.detail, model=model, status=status)
    return exc


def _json_error(raw: bytes) -> bool:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and "error" in data


def _transport_error(exc: BaseException, *, op: str, timeout: float, model: str) -> ProviderError:
    """A failure with no HTTP answer: unknown for a submission unless nothing was sent."""
    if isinstance(exc, aiohttp.ClientConnectorError):  # no connection: the request never left
        return TransientError(f"cannot connect: {exc}", model=model, kind="connection")
    what = f"no complete answer within {timeout:g}s" if isinstance(exc, TimeoutError) else \
        f"{type(exc).__name__}: {exc}"
    if op == "submit":
        return SubmitUnknownError(f"outcome unknown ({what}); find the batch before sending its lines again",
                                  model=model)
    kind = "timeout" if isinstance(exc, TimeoutError) else \
        "bad_response" if isinstance(exc, aiohttp.ClientPayloadError) else "connection"
    return TransientError(what, model=model, kind=kind)


@dataclass(frozen=True, slots=True)
class Http:
    """How the client talks HTTP: a deadline per call, a few retries for reads, nothing else.

    >>> http = Http(timeout=60, attempts=3)
    """

    timeout: float = 60.0
    attempts: int = 3  # per GET; submissions, uploads and cancels are sent once
    backoff: float = 0.5

    async def send(self, session: aiohttp.ClientSession, endpoint: Endpoint, method: str, url: str, *, op: str,
                   data: Any = None, params: Mapping[str, Any] | None = None, json_body: bool = True,
                   model: str = "", size: int = 0) -> bytes:
        """One request; the body of a 2xx answer, or the mapped ProviderError (without the key).

        ``size`` (bytes sent) stretches the deadline, so a 200 MB submission is not cut off at 60 s."""
        headers = headers_for(endpoint, json_body=json_body)
        deadline = self.timeout + size / MIN_BYTES_PER_SECOND
        try:
            async with asyncio.timeout(deadline):
                async with session.request(method, url, data=data, params=params, headers=headers) as resp:
                    raw = await resp.read()
                    status, answer_headers = resp.status, resp.headers
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _redacted(_transport_error(exc, op=op, timeout=deadline, model=model), endpoint) from None
        if not 200 <= status < 300:
            raise _redacted(http_error(status, raw, answer_headers, op=op, model=model), endpoint)
        return raw

    async def read_json(self, session: aiohttp.ClientSession, endpoint: Endpoint, url: str, *, op: str,
                        params: Mapping[str, Any] | None = None, model: str = "") -> Mapping[str, Any]:
        """GET a JSON object, retrying transient failures (reads are idempotent)."""
        for attempt in range(1, self.attempts + 1):
            try:
                raw = await self.send(session, endpoint, "GET", url, op=op, params=params, model=model)
                return json_object(raw, url, model)
            except TransientError as exc:
                if attempt >= self.attempts:
                    raise
                await asyncio.sleep(min(exc.retry_after or self.backoff * 2 ** (attempt - 1), MAX_WAIT_SECONDS))
        raise AssertionError("attempts must be at least 1")

    async def lines(self, session: aiohttp.ClientSession, endpoint: Endpoint, url: str, *, op: str,
                    model: str = "") -> AsyncIterator[bytes]:
        """The non-empty lines of a (possibly very large) JSONL download, streamed; no retry here.

        The deadline is per read, not for the whole file: a 200 MB output file may take minutes."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout)
        try:
            async with session.get(url, headers=headers_for(endpoint, json_body=False), timeout=timeout) as resp:
                if resp.status != 200:
                    raise http_error(resp.status, await resp.read(), resp.headers, op=op, model=model)
                rest = b""
                async for chunk in resp.content.iter_any():
                    *complete, rest = (rest + chunk).split(b"\n")
                    for line in complete:
                        if line.strip():
                            yield line
                if rest.strip():
                    yield rest
        except ProviderError as exc:
            raise _redacted(exc, endpoint) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _redacted(_transport_error(exc, op=op, timeout=self.timeout, model=model), endpoint) from None


def json_object(raw: bytes, url: str, model: str = "") -> Mapping[str, Any]:
    """A 2xx body as a JSON object; a TransientError (bad_response) when it is not one."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise TransientError(f"{url} did not answer a JSON object: {raw[:120]!r}", model=model, kind="bad_response")
    return data


def headers_for(endpoint: Endpoint, *, json_body: bool) -> dict[str, str]:
    """The endpoint's headers (key included); without its JSON Content-Type for multipart and downloads."""
    headers = {"User-Agent": USER_AGENT, **endpoint.headers}
    if not json_body:
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    return headers


def _redacted(exc: ProviderError, endpoint: Endpoint) -> ProviderError:
    exc.redact(endpoint.secret)
    return exc


