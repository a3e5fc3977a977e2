"""batch_api.py and its modules: the OpenRouter client over HTTP against the simulator, and the shared mappings.

OpenAI's client is in test_batch_client_openai.py. Batch timings are scaled
to tenths of a second; every wait is bounded by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from batch.batch_api import (CLOCK_SKEW_SECONDS, BatchClient, BatchInfo, BatchLimitError, Limits,
                             OpenRouterBatches, ResultLines, SubmitUnknownError, batch_failure, client_for)
from batch.batch_http import http_error
from batch.batch_lines import LineResult, line_result
from batch.batch_openai import openai_info
from batch.batch_openrouter import openrouter_info
from batch.errors import FallbackError, FatalError, ProviderError, RateLimited, RejectedError, TransientError
from batch.provider import Endpoint
from batch.sim import SimConfig, Simulator
from batch.sim_answers import answer_for, truncate, usage_for
from tests.conftest import TEST_KEY

FAST: dict[str, Any] = dict(batch_validating_seconds=0.25, batch_median_seconds=0.25, batch_spread=0.0,
                            batch_finalizing_seconds=0.25, api_key=TEST_KEY)
MODEL = "openai/gpt-4.1-mini"
DEADLINE = 20.0  # seconds any one wait for a batch may take


def endpoint(sim: Simulator, prefix: str = "/api/v1", key: str = TEST_KEY) -> Endpoint:
    """The chat endpoint a job would configure for the simulator, with the key in its headers."""
    return Endpoint(name="sim", url=f"http://127.0.0.1:{sim.port}{prefix}/chat/completions",
                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"}, secret=key)


def messages(i: int, prefix: str = "row") -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"Say hello number {i} to the {prefix} world please"}]


def rows(n: int, prefix: str = "row", max_tokens: int = 6) -> list[tuple[str, bytes]]:
    """(custom_id, body) pairs as the planner would give them: chat bodies without a model."""
    return [(f"{prefix}-{i}", orjson.dumps({"messages": messages(i, prefix), "max_tokens": max_tokens}))
            for i in range(n)]


def expected(custom_id: str, model: str = MODEL, max_tokens: int = 6) -> tuple[str, float]:
    """The simulator's answer to a row of ``rows`` and its cost at the batch price."""
    prefix, i = custom_id.rsplit("-", 1)
    text = truncate(answer_for(messages(int(i), prefix)), max_tokens)[0]
    return text, round(usage_for(messages(int(i), prefix), text, model)["cost"] * 0.5, 12)


async def wait(client: BatchClient, s: aiohttp.ClientSession, ep: Endpoint, info: BatchInfo,
               seen: list[str] | None = None) -> BatchInfo:
    """Poll until terminal, noting each new status in ``seen`` (starting with the submit answer's)."""
    seen = [] if seen is None else seen
    async with asyncio.timeout(DEADLINE):
        while True:
            if not seen or seen[-1] != info.status:
                seen.append(info.status)
            if info.terminal:
                return info
            await asyncio.sleep(0.02)
            info = await client.get(s, ep, info.id)


async def collect(lines: ResultLines) -> dict[str, LineResult]:
    got: dict[str, LineResult] = {}
    async with asyncio.timeout(DEADLINE):
        async for line in lines:
            assert line.custom_id not in got
            got[line.custom_id] = line
    return got


def run(config: SimConfig, test: Callable[[Simulator, aiohttp.ClientSession], Awaitable[None]]) -> None:
    async def go() -> None:
        async with Simulator(config) as sim, aiohttp.ClientSession() as s:
            await test(sim, s)
    asyncio.run(go())


class TestOpenRouterClient:
    def test_submit_poll_and_read_every_line(self) -> None:
        """A batch goes through every status; each custom_id comes back once with the sim's answer at half price."""
        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openrouter"), endpoint(sim)
            info = await client.submit(s, ep, MODEL, rows(12), "tag-1")
            assert info.api == "openrouter" and info.status == "validating" and info.model == MODEL
            seen: list[str] = []
            done = await wait(client, s, ep, info, seen)
            assert seen == ["validating", "in_progress", "finalizing", "completed"]
            assert done.request_counts is not None and done.request_counts.total == 12
            assert done.provider == "Sim" and done.created_at and done.expires_at and done.finished_at
            lines = client.results(s, ep, done)
            got = await collect(lines)
            assert sorted(got) == sorted(cid for cid, _ in rows(12)) and lines.source == "paged"
            for cid, line in got.items():
                text, cost = expected(cid)
                assert line.reply is not None and line.reply.text == text and line.cost == cost
            assert done.usage is not None and done.usage.cost == pytest.approx(sum(x.cost or 0 for x in got.values()))
            assert sim.batches is not None and set(sim.batches.counters().submitted.values()) == {1}
        run(SimConfig(**FAST), test)

    def test_results_follow_small_pages(self) -> None:
        """With 5-line pages, 23 lines come back through the cursors, each exactly once."""
        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openrouter", page_size=5), endpoint(sim)
            done = await wait(client, s, ep, await client.submit(s, ep, MODEL, rows(23), "t"))
            lines = client.results(s, ep, done)
            got = await collect(lines)
            assert len(got) == lines.lines == 23 and lines.duplicates == 0 and lines.source == "paged"
        run(SimConfig(**FAST), test)

    @pytest.mark.parametrize("inline, window, source, answered", [
        ("terminal", None, "inline", 8), ("completed", None, "inline", 8),
        ("terminal", 0.45, "inline", None), ("completed", 0.45, "none", 0)])
    def test_inline_results_without_paging(self, inline: str, window: float | None, source: str,
                                           answered: int | None) -> None:
        """Without /results (the beta), inline results are read under either reading of open question 3."""
        cfg = {**FAST, "batch_results_paging": False, "batch_inline_results": inline}
        if window is not None:
            cfg.update(batch_validating_seconds=0.05, batch_median_seconds=1.0, batch_window_seconds=window)

        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openrouter"), endpoint(sim)
            done = await wait(client, s, ep, await client.submit(s, ep, MODEL, rows(8), "t"))
            lines = client.results(s, ep, done)
            got = await collect(lines)
            assert lines.source == source and done.status == ("completed" if window is None else "expired")
            ok = sum(1 for line in got.values() if line.ok)
            assert ok == answered if answered is not None else 0 < ok < len(got) == 8
        run(SimConfig(**cfg), test)

    def test_expiry_returns_answers_and_expired_lines(self) -> None:
        """An expired batch gives its finished lines, billed, and batch_expired errors for the rest."""
        cfg = SimConfig(**{**FAST, "batch_validating_seconds": 0.05, "batch_median_seconds": 1.0,
                           "batch_window_seconds": 0.45})

        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openrouter"), endpoint(sim)
            seen: list[str] = []
            done = await wait(client, s, ep, await client.submit(s, ep, MODEL, rows(20), "t"), seen)
            assert seen == ["validating", "in_progress", "expired"]
            got = await collect(client.results(s, ep, done))
            ok = [x for x in got.values() if x.ok]
            expired = [x for x in got.values() if not x.ok]
            assert len(got) == 20 and 0 < len(ok) < 20
            assert all(isinstance(x.error, TransientError) and x.error.kind == "batch_expired" and x.cost is None
                       for x in expired)
            assert all(x.cost == expected(x.custom_id)[1] for x in ok)
            assert done.usage is not None and done.usage.cost == pytest.approx(sum(x.cost or 0 for x in ok))
        run(cfg, test)

    def test_failed_lines_classify_as_online(self) -> None:
        """Failed lines of a completed batch are the online error classes: 5xx transient, 400 rejected."""
        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openrouter"), endpoint(sim)
            done = await wait(client, s, ep, await client.submit(s, ep, MODEL, rows(30), "t"))
            got = await collect(client.results(s, ep, done))
            failed = [x.error for x in got.values() if x.error is not None]
            assert done.status == "completed" and done.request_counts and done.request_counts.failed == len(failed) > 0
            assert {type(e) for e in failed} == {TransientError, RejectedError}
        run(SimConfig(**FAST, batch_line_failures=0.4, seed=3), test)

    def test_retired_model_fails_the_batch(self) -> None:
        """A batch for a retired model fails with the simulator's message, read as no_batch_endpoint."""
        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openrouter"), endpoint(sim)
            seen: list[str] = []
            done = await wait(client, s, ep, await client.submit(s, ep, "old/model", rows(3), "t"), seen)
            assert seen == ["validating", "failed"] and done.error and "old/model" in done.error
            failure = batch_failure(done)
            assert isinstance(failure, FallbackError) and failure.kind == "no_batch_endpoint"
            assert await collect(client.results(s, ep, done)) == {}
        run(SimConfig(**FAST, retired=("old/model",)), test)

    def test_field_order_and_line_models(self) -> None:
        """Options and the batch model precede requests, and line bodies lose any model, so the sim accepts it."""
        client = OpenRouterBatches()
        lines = rows(3) + [("odd", orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "model"}],
                                                 "max_tokens": 3}))]
        options = {"provider": {"only": ["sim"]}, "callback_url": "https://example.invalid/hook"}
        body = orjson.loads(client.submission(MODEL + ":batch", lines, options))
        assert list(body) == ["endpoint", "model", "completion_window", "provider", "callback_url", "requests"]
        assert all("model" not in r["body"] for r in body["requests"])

        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            ep = endpoint(sim)
            done = await wait(client, s, ep, await client.submit(s, ep, MODEL + ":batch", lines, "t", options=options))
            got = await collect(client.results(s, ep, done))
            assert done.status == "completed" and all(x.ok for x in got.values()) and len(got) == 4
        run(SimConfig(**FAST), test)

    def test_limits_refuse_before_sending(self) -> None:
        """Over 5,000 lines or the byte limit, submit refuses without a request; the provider's 413 is rejected."""
        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            ep = endpoint(sim)
            client = client_for("openrouter")
            assert client.limits == Limits(5_000, 200_000_000)
            with pytest.raises(BatchLimitError, match="5,000"):
                await client.submit(s, ep, MODEL, rows(5_001), "t")
            with pytest.raises(BatchLimitError, match="bytes"):
                await client_for("openrouter", limits=Limits(10, 500)).submit(s, ep, MODEL, rows(10), "t")
            with pytest.raises(ValueError, match="twice"):
                await client.submit(s, ep, MODEL, rows(2) * 2, "t")
            assert sim.batches is not None and sim.batches.counters().batches == {}
            with pytest.raises(RejectedError) as refused:
                await client.submit(s, ep, MODEL, rows(40), "t")  # over the sim's batch_max_bytes
            assert refused.value.status == 413
        run(SimConfig(**FAST, batch_max_bytes=3_000), test)

    def test_find_by_model_total_and_time(self) -> None:
        """A batch whose submit answer was lost is found by model, size and time; others of its shape are too."""
        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openrouter"), endpoint(sim)
            start = time.time()
            lost = (await client.submit(s, ep, MODEL, rows(4, "a"), "t")).id  # the answer "lost": only the test knows
            await client.submit(s, ep, MODEL, rows(5, "b"), "t")
            await client.submit(s, ep, "sim/other", rows(4, "c"), "t")
            found = await client.find(s, ep, model=MODEL + ":batch", tag="t", created_after=start - CLOCK_SKEW_SECONDS,
                                      total=4)
            assert [b.id for b in found] == [lost]
            twin = await client.submit(s, ep, MODEL, rows(4, "d"), "t")
            found = await client.find(s, ep, model=MODEL, tag="t", created_after=start - CLOCK_SKEW_SECONDS, total=4)
            assert [b.id for b in found] == [twin.id, lost]  # newest first; the caller holds rows for both
            assert await client.find(s, ep, model=MODEL, tag="t", created_after=time.time() + 60, total=4) == []
        run(SimConfig(**FAST), test)

    def test_cancel_sends_nothing(self) -> None:
        """OpenRouter has no cancel endpoint: cancel answers False without touching the (closed) session."""
        async def go() -> None:
            s = aiohttp.ClientSession()
            await s.close()
            ep = Endpoint(name="x", url="http://127.0.0.1:9/api/v1/chat/completions", headers={})
            assert await client_for("openrouter").cancel(s, ep, "batch-1") is False
        asyncio.run(go())


async def _one_answer_server(answer: bytes | None) -> tuple[asyncio.Server, int]:
    """A TCP server that reads one HTTP request, then sends ``answer`` or closes without a word."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        sizes = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
        length = sizes[0] if sizes else 0
        await reader.readexactly(length)
        if answer is not None:
            writer.write(answer)
            await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class TestErrors:
    @pytest.mark.parametrize("answer, status", [
        (None, None),
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 502),
        (b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", None)])
    def test_submit_outcome_unknown(self, answer: bytes | None, status: int | None) -> None:
        """A reset after sending, a gateway 502 or an accepted answer without an id is unknown, never retryable."""
        async def go() -> None:
            server, port = await _one_answer_server(answer)
            async with server, aiohttp.ClientSession() as s:
                ep = Endpoint(name="x", url=f"http://127.0.0.1:{port}/api/v1/chat/completions", headers={})
                with pytest.raises(SubmitUnknownError) as unknown:
                    await client_for("openrouter").submit(s, ep, MODEL, rows(2), "t")
                assert not isinstance(unknown.value, TransientError) and unknown.value.status == status
        asyncio.run(go())

    def test_refused_connection_is_retryable(self) -> None:
        """A connection refused before anything was sent is a plain TransientError: nothing reached the provider."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]

        async def go() -> None:
            async with aiohttp.ClientSession() as s:
                ep = Endpoint(name="x", url=f"http://127.0.0.1:{port}/api/v1/chat/completions", headers={})
                with pytest.raises(TransientError) as refused:
                    await client_for("openrouter").submit(s, ep, MODEL, rows(2), "t")
                assert refused.value.kind == "connection"
        asyncio.run(go())

    def test_http_failures_are_mapped_without_the_key(self) -> None:
        """A wrong key is fatal and not repeated; an unknown id is batch_not_found; a missing route no_batch_api."""
        wrong = "sk-wrong-key-0123456789abcdef"

        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client = client_for("openrouter")
            with pytest.raises(FatalError) as fatal:
                await client.submit(s, endpoint(sim, key=wrong), MODEL, rows(1), "t")
            assert fatal.value.kind == "auth" and wrong not in str(fatal.value) and wrong not in repr(fatal.value.args)
            with pytest.raises(RejectedError) as missing:
                await client.get(s, endpoint(sim), "batch-nope")
            assert missing.value.kind == "batch_not_found"
            with pytest.raises(FallbackError) as no_api:
                await client.submit(s, endpoint(sim, prefix="/api/nope"), MODEL, rows(1), "t")
            assert no_api.value.kind == "no_batch_api"
        run(SimConfig(**FAST), test)

    @pytest.mark.parametrize("status, body, op, cls, kind", [
        (400, {"error": {"message": "Model 'openai/gpt-4o-mini:batch' does not have a :batch endpoint."}}, "submit",
         FallbackError, "no_batch_endpoint"),
        (422, {"error": {"message": "openai/gpt-4o:online is not available for batch"}}, "submit",
         FallbackError, "no_batch_endpoint"),
        (404, {"error": {"message": "No endpoints found for x/y"}}, "submit", FallbackError, "no_batch_endpoint"),
        (400, {"error": {"message": "'requests' must be a non-empty array."}}, "submit", RejectedError, "bad_request"),
        (413, {"error": {"message": "too large"}}, "submit", RejectedError, "bad_request"),
        (404, b"404: Not Found", "submit", FallbackError, "no_batch_api"),
        (405, b"405: Method Not Allowed", "cancel", FallbackError, "no_batch_api"),
        (404, {"error": {"message": "Batch not found"}}, "get", RejectedError, "batch_not_found"),
        (401, {"error": {"message": "bad key"}}, "list", FatalError, "auth"),
        (402, {"error": {"message": "credits"}}, "submit", FatalError, "payment_required"),
        (403, {"error": {"message": "forbidden"}}, "get", FatalError, "forbidden"),
        (429, {"error": {"message": "slow down"}}, "submit", RateLimited, "rate_limited"),
        (500, {"error": {"message": "oops"}}, "get", TransientError, "server_error"),
        (500, {"error": {"message": "oops"}}, "submit", SubmitUnknownError, "submit_unknown"),
        (408, b"", "submit", SubmitUnknownError, "submit_unknown"),
        (409, {"error": {"message": "not terminal"}}, "results", TransientError, "server_error"),
    ])
    def test_status_table(self, status: int, body: Any, op: str, cls: type[ProviderError], kind: str) -> None:
        """Every (status, body, operation) maps to the error class and kind that decide what the caller does."""
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        exc = http_error(status, raw, {}, op=op, model="m")
        assert type(exc) is cls and exc.kind == kind

    @pytest.mark.parametrize("envelope, cls, kind", [
        ({"response": {"status_code": 500, "body": {"error": {"message": "boom", "type": "server_error"}}},
          "error": None}, TransientError, "server_error"),
        ({"response": {"status_code": 400, "body": {"error": {"message": "bad", "type": "invalid_request_error"}}},
          "error": None}, RejectedError, "bad_request"),
        ({"response": None, "error": {"code": "context_length_exceeded", "message": "maximum context length"}},
         FallbackError, "context_length"),
        ({"response": None, "error": {"code": "batch_expired", "message": "window expired"}},
         TransientError, "batch_expired"),
        ({"response": None, "error": {"type": "batch_cancelled", "message": "cancelled", "param": None}},
         TransientError, "batch_cancelled"),
        ({"response": None, "error": {"type": "server_error", "message": "x", "error_type": "provider_error"}},
         TransientError, "server_error"),
        ({"response": None, "error": {"type": "rate_limit_exceeded", "message": "slow"}}, RateLimited, "rate_limited"),
        ({"response": None, "error": {"code": "invalid_request_error", "message": "no"}}, RejectedError, "bad_request"),
        ({"response": {"status_code": 200, "body": {"choices": [{"message": {"content": "par"},
                                                                 "finish_reason": "error", "error": {"code": 502}}],
                                                    "usage": {"cost": 0.25}}}},
         TransientError, "upstream_error"),
        ({"response": {"status_code": 200, "body": {"choices": [{"message": {"content": ""},
                                                                 "finish_reason": "content_filter"}]}}},
         FallbackError, "content_filter"),
        ({"response": None, "error": None}, TransientError, "bad_response"),
    ])
    def test_line_shapes(self, envelope: dict[str, Any], cls: type[ProviderError], kind: str) -> None:
        """Each line failure shape of either API is the error an online request failing that way would be."""
        line = line_result("x", envelope, "m")
        assert line.reply is None and type(line.error) is cls and line.error.kind == kind
        if kind == "upstream_error":
            assert line.cost == 0.25  # a partial answer is billed, as online

    def test_duplicate_and_unattributable_lines(self) -> None:
        """A repeated custom_id is yielded once and counted; a line without one is counted as malformed."""
        ok = {"response": {"status_code": 200, "body": {"choices": [{"message": {"content": "hi"}}],
                                                        "usage": {"prompt_tokens": 1, "completion_tokens": 1}}}}

        async def envelopes(_: ResultLines) -> AsyncGenerator[Any, None]:
            for envelope in ({"custom_id": "a", **ok}, {"custom_id": "a", "error": {"code": "x"}},
                             {"custom_id": "b", **ok}, {"response": None}, None):
                yield envelope

        async def go() -> None:
            lines = ResultLines(envelopes, "m", None)
            got = await collect(lines)
            assert sorted(got) == ["a", "b"] and got["a"].ok and (lines.duplicates, lines.malformed) == (1, 2)
            with pytest.raises(RuntimeError):
                lines.__aiter__()
        asyncio.run(go())

    def test_batch_objects_tolerate_nulls_and_unknown_statuses(self) -> None:
        """Missing fields and nulls read as None; an unknown status reads as in_progress and says so."""
        ep = Endpoint(name="x", url="http://h/v1/chat/completions", headers={}, secret="sk-secret-value-123456")
        odd = openrouter_info({"id": "b1", "status": "paused", "request_counts": None, "usage": None, "error": None,
                               "created_at": "2026-09-28T12:00:00Z", "expires_at": None}, ep)
        assert (odd.status, odd.known_status, odd.provider_status) == ("in_progress", False, "paused")
        assert odd.request_counts is None and odd.usage is None and odd.created_at == 1790596800
        failed = openrouter_info({"id": "b2", "status": "failed",
                                  "error": {"message": "key sk-secret-value-123456 is bad"}}, ep)
        assert failed.error is not None and "sk-secret" not in failed.error
        spelled = openai_info({"id": "b3", "status": "canceled", "errors": {"data": [
            {"code": "token_limit_exceeded", "message": "Enqueued token limit reached", "line": None}]}}, ep)
        assert spelled.status == "cancelled" and spelled.known_status and spelled.error_code == "token_limit_exceeded"
        with pytest.raises(TransientError):
            openai_info({"status": "completed"}, ep)
        with pytest.raises(ValueError):
            client_for("anthropic")
