"""provider.py: one call over real HTTP, and the one table that maps failures to classes."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from batch.errors import FallbackError, FatalError, RateLimited, RejectedError, TransientError
from batch.failures import classify, parse_duration, retry_after
from batch.provider import make_endpoint, open_session, send
from batch.sim import SimThread
from batch.errors import JobError


def body(code: Any = None, message: str = "", **extra: Any) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message, **extra}})


CASES = [
    # (status, body, class, kind)
    (429, body("rate_limit_exceeded", "Rate limit reached", type="requests"), RateLimited, "rate_limited"),
    (429, body(429, "Rate limit exceeded"), RateLimited, "rate_limited"),
    (429, body("insufficient_quota", "You exceeded your current quota", type="insufficient_quota"), FatalError, "quota_exceeded"),
    (429, body(429, "busy", availability={"code": "capacity_exhausted", "retryable": True}), RateLimited, "rate_limited"),
    (400, body("context_length_exceeded", "This model's maximum context length is 16385 tokens"), FallbackError, "context_length"),
    (400, body(400, "too long", metadata={"error_type": "context_length_exceeded"}), FallbackError, "context_length"),
    (400, body(400, "flagged", metadata={"error_type": "content_policy_violation"}), FallbackError, "content_filter"),
    (400, body("invalid_request", "temperature must be <= 2"), RejectedError, "bad_request"),
    (422, body(422, "unprocessable"), RejectedError, "bad_request"),
    (401, body(401, "No auth credentials found"), FatalError, "auth"),
    (402, body(402, "Insufficient credits"), FatalError, "payment_required"),
    (403, body(403, "Key disabled"), FatalError, "forbidden"),
    (403, body(403, "Input was flagged by moderation"), FallbackError, "content_filter"),
    (404, body(404, "model retired", availability={"code": "model_deprecated", "retryable": False}), FallbackError, "model_not_found"),
    (404, body(404, "No endpoints found for x/y"), FallbackError, "model_not_found"),
    (503, body(503, "no provider", availability={"code": "no_endpoints", "retryable": False}), FallbackError, "model_unavailable"),
    (503, body(503, "overloaded", availability={"code": "temporarily_unavailable", "retryable": True}), TransientError, "server_error"),
    (408, body(408, "timed out"), TransientError, "timeout"),
    (409, body(409, "conflict"), TransientError, "server_error"),
    (500, b"<html>oops</html>", TransientError, "server_error"),
    (502, body(502, "bad gateway"), TransientError, "server_error"),
    (504, b"", TransientError, "timeout"),
    (200, body(502, "upstream died"), TransientError, "server_error"),
    (200, body(None, "mystery"), TransientError, "upstream_error"),
]


@pytest.mark.parametrize(("status", "raw", "cls", "kind"), CASES)
def test_every_failure_maps_to_one_class(status: int, raw: bytes, cls: type, kind: str) -> None:
    """Each (status, body) the providers send maps to the error class that decides the next step."""
    err = classify(status, raw, {}, "m")
    assert type(err) is cls
    assert err.kind == kind


@pytest.mark.parametrize(("text", "seconds"), [
    ("1s", 1.0), ("6m0s", 360.0), ("12ms", 0.012), ("1.5s", 1.5), ("1h2m3s", 3723.0), ("2", 2.0), ("soon", None),
])
def test_go_durations(text: str, seconds: float | None) -> None:
    """x-ratelimit-reset-* values are Go-style durations."""
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_prefers_the_most_precise_header() -> None:
    """retry-after-ms beats retry-after, which beats the reset headers and the message."""
    assert retry_after({"retry-after-ms": "250", "retry-after": "3"}, {}, "") == 0.25
    assert retry_after({"retry-after": "3"}, {}, "") == 3.0
    # reset is the time to a *full* reset: only the exhausted budget's counts, and only for a 429
    resets = {"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "6m0s",
              "x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "5000"}
    assert retry_after(resets, {}, "", limited=True) == 2.0
    assert retry_after({**resets, "x-ratelimit-remaining-requests": "3"}, {}, "", limited=True) is None
    assert retry_after(resets, {}, "") is None  # a 5xx takes no wait from rate-limit headers
    assert retry_after(resets, {}, "Please try again in 1.574s.", limited=True) == pytest.approx(1.574)
    assert retry_after({}, {}, "Please try again in 20ms.", limited=True) == pytest.approx(0.02)
    assert retry_after({}, {"availability": {"retry_after": 7}}, "") == 7.0


class TestSend:
    def test_reply_is_parsed_over_http(self, sim: SimThread) -> None:
        """A real call to the simulator yields text, finish reason, model, provider, usage and cost."""
        async def go() -> Any:
            async with open_session(4) as session:
                ep = make_endpoint("sim", sim.base_url, None, {})
                body = b'{"model":"openai/gpt-4.1-mini","messages":[{"role":"user","content":"hi (a/b)"}]}'
                return await send(session, ep, "openai/gpt-4.1-mini", body, 10)

        reply = asyncio.run(go())
        assert reply.text in ("a", "b") and reply.finish_reason == "stop"
        assert reply.model == "openai/gpt-4.1-mini" and reply.provider == "Sim"
        assert reply.prompt_tokens > 0 and reply.completion_tokens == 1 and reply.cost is not None

    def test_connection_refused_is_transient(self) -> None:
        """Nothing listening is a retryable connection error, not a crash."""
        async def go() -> None:
            async with open_session(1) as session:
                ep = make_endpoint("x", "http://127.0.0.1:9/v1", None, {})
                await send(session, ep, "m", b"{}", 5)

        with pytest.raises(TransientError) as info:
            asyncio.run(go())
        assert info.value.kind == "connection"

    def test_key_is_read_from_env_and_never_shown(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The endpoint's repr hides the key; a missing variable is named."""
        monkeypatch.setenv("SIM_API_KEY", "sk-secret-123")
        ep = make_endpoint("p", "http://127.0.0.1:1/v1", "SIM_API_KEY", {})
        assert "sk-secret-123" not in repr(ep)
        monkeypatch.delenv("SIM_API_KEY")
        with pytest.raises(JobError, match="SIM_API_KEY"):
            make_endpoint("p", "http://127.0.0.1:1/v1", "SIM_API_KEY", {})
