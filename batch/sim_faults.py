"""The simulator's failures: models that cannot answer, and injected faults.

``unavailable`` answers what a provider says before a model runs: retired
(404 ``model_deprecated`` with OpenRouter's ``availability`` object), missing
(404 ``model_not_found``), down for a while (503), a ``response_format`` the
model refuses (400), a prompt over its context window (400
``context_length_exceeded``).

``pick_fault`` chooses an injected fault from a hash of (seed, prompt, how
often that prompt was seen), by probability or by a per-model schedule, so a
row meets the same faults whatever order requests arrive in; ``inject``
produces it on the wire (see ``batch.catalog.SIM_FAULTS`` for the kinds).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from batch.sim_answers import usage_for


def error_response(status: int, message: str, code: Any, headers: Mapping[str, str] | None = None,
                   **extra: Any) -> web.Response:
    """An error in the providers' shape: ``{"error": {"code", "message", ...}}``."""
    body = {"error": {"code": code, "message": message, **extra}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json",
                        headers=headers)


def echo_key(response: web.Response, authorization: str, how: str) -> web.Response:
    """An error response that repeats the caller's key in its message, as careless proxies do."""
    body = response.body
    if not isinstance(body, bytes) or b'"error"' not in body:
        return response
    key = authorization.removeprefix("Bearer ").strip()
    shown = key if how == "full" else f"{key[:6]}{'*' * max(4, len(key) - 10)}{key[-4:]}"
    data = orjson.loads(body)
    err = data.get("error")
    if not isinstance(err, dict):
        return response
    err["message"] = f"{err.get('message', '')} (Incorrect API key provided: {shown}; header was {authorization})" \
        if how == "full" else f"{err.get('message', '')} (Incorrect API key provided: {shown})"
    return web.Response(status=response.status, body=orjson.dumps(data), content_type="application/json",
                        headers={k: v for k, v in response.headers.items() if k.lower() != "content-type"
                                 and k.lower() != "content-length"})


BILLED_FAULTS = ("finish_error", "content_filter")  # HTTP 200s that are not answers but carry a charge
ODD_REPLIES = ("content_parts", "string_numbers", "bad_content", "huge_int", "odd_usage")


def odd_reply(kind: str, reply: dict[str, Any]) -> bytes:
    """A reply in an odd shape real providers and proxies send (see SimConfig.odd_replies)."""
    message = reply["choices"][0]["message"]
    usage = reply["usage"]
    if kind == "content_parts":  # OpenAI-style content parts instead of a string
        text = message["content"]
        message["content"] = [{"type": "text", "text": text[: len(text) // 2]}, {"type": "text",
                                                                               "text": text[len(text) // 2:]}]
    elif kind == "string_numbers":
        usage.update({k: str(v) for k, v in usage.items()})
        usage["prompt_tokens_details"] = {"cached_tokens": "0"}
    elif kind == "bad_content":
        message["content"] = {"unexpected": 42}
    elif kind == "huge_int":
        message["content"] = _huge_ints(message["content"])
    elif kind == "odd_usage":
        usage.update(prompt_tokens=-1, completion_tokens=None, cost="n/a",
                     completion_tokens_details=["reasoning", 3])
    return json.dumps(reply).encode()  # the standard library writes integers orjson refuses


def _huge_ints(text: str) -> str:
    """A JSON answer with every integer replaced by one beyond 64 bits; other answers unchanged."""
    try:
        value = json.loads(text)
    except ValueError:
        return text

    def grow(v: Any) -> Any:
        if isinstance(v, bool):
            return v
        if isinstance(v, int):
            return 2**70 + v
        if isinstance(v, dict):
            return {k: grow(x) for k, x in v.items()}
        if isinstance(v, list):
            return [grow(x) for x in v]
        return v
    return json.dumps(grow(value))


def flex_refusal(style: str, retry_after: float) -> web.Response:
    """No flex capacity now: not billed. OpenAI: 429 code flex_unavailable; OpenRouter: its availability
    error, capacity_exhausted and retryable (WIRE-BATCH.md C1, C2; open questions 11 and 12)."""
    if style == "openrouter":
        return error_response(429, "No flex capacity is available for this model right now", 429,
                              headers={"Retry-After": f"{retry_after:g}"},
                              availability={"code": "capacity_exhausted", "retryable": True,
                                            "retry_after": retry_after})
    return error_response(429, "Resource Unavailable: flex processing is temporarily unavailable, please retry "
                          "later or use the default service tier", "flex_unavailable", type="resource_unavailable")


def fault_draw(seed: int, key: str, nth: int) -> float:
    """A uniform number in [0, 1) from (seed, prompt, nth request of that prompt)."""
    h = hashlib.blake2b(f"{seed}:{key}:{nth}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def pick_fault(faults: Mapping[str, float], schedule: Mapping[str, list[str]], seed: int, model: str,
               key: str, nth: int) -> tuple[str | None, float | None]:
    """The fault the nth request of a prompt meets, and its argument (a Retry-After), if any."""
    plan = schedule.get(model) or schedule.get("*")
    if plan is not None and nth < len(plan):
        kind, _, arg = plan[nth].partition(":")
        return (None if kind == "ok" else kind), (float(arg) if arg else None)
    if faults:
        u = fault_draw(seed, key, nth)
        for kind, p in faults.items():
            if u < p:
                return kind, None
            u -= p
    return None, None


def unavailable(model: str, *, retired: bool, exists: bool, down: bool, formats: tuple[str, ...],
                window: int, messages: list[dict[str, Any]], body: Mapping[str, Any],
                endpoints: bool = True) -> web.Response | None:
    """What a provider answers before the model runs, or None when the model can take the request."""
    if not endpoints:
        return error_response(404, f"No endpoints found for {model}.", 404)
    if retired:
        return error_response(404, f"{model} has been retired", 404, availability={
            "code": "model_deprecated", "retryable": False, "requested_models": [model]})
    if not exists:
        return error_response(404, f"model {model} does not exist", 404, availability={
            "code": "model_not_found", "retryable": False, "requested_models": [model]})
    if down:
        return error_response(503, f"{model} is down", 503, headers={"Retry-After": "0"},
                              metadata={"error_type": "provider_unavailable"})
    if (refused := request_refusal(model, formats, window, messages, body)) is not None:
        return error_response(400, refused[1], refused[0])
    return None


def request_refusal(model: str, formats: tuple[str, ...], window: int, messages: list[dict[str, Any]],
                    body: Mapping[str, Any]) -> tuple[str, str] | None:
    """(code, message) of the 400 a model gives a request it cannot take: a response_format it
    refuses, or a prompt plus max_tokens over its context window. None when it can take it."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (*formats, "text"):
        return "invalid_request_error", (f"Invalid parameter: 'response_format' of type '{fmt.get('type')}' is "
                                         "not supported with this model.")
    prompt = usage_for(messages, "", model)["prompt_tokens"]
    if prompt + (body.get("max_tokens") or 0) > window:
        return "context_length_exceeded", (f"This model's maximum context length is {window} tokens. "
                                           f"However, you requested {prompt} tokens.")
    return None


def _billed_failure(fault: str, model: str, messages: list[dict[str, Any]]) -> web.Response:
    """An HTTP 200 that is not an answer: finish_reason "error" (partly billed) or a content filter."""
    usage = usage_for(messages, "par", model)
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": "par"},
                              "finish_reason": "error" if fault == "finish_error" else "content_filter"}
    if fault == "finish_error":
        choice["error"] = {"code": 502, "message": "upstream stopped mid-answer"}
    reply = {"id": "gen-sim-err", "model": model, "choices": [choice], "usage": usage}
    return web.Response(body=orjson.dumps(reply), content_type="application/json")


def _simple(fault: str, wait: float) -> web.Response | None:
    """Faults that are one error response, or None."""
    retry = {"Retry-After": f"{wait:g}"}
    simple: dict[str, tuple[int, str, Any, dict[str, Any]]] = {
        "429": (429, "Rate limit exceeded", "rate_limit_exceeded", {"headers": retry}),
        "insufficient_quota": (429, "You exceeded your current quota", "insufficient_quota",
                               {"type": "insufficient_quota"}),
        "500": (500, "upstream error", 500, {}), "502": (502, "upstream error", 502, {}),
        "504": (504, "upstream error", 504, {}),
        "503": (503, "overloaded", 503, {"headers": retry}),
        "401": (401, "No auth credentials found", 401, {}),
        "402": (402, "Insufficient credits", 402, {}),
        "error_in_200": (200, "Provider returned error", 502, {"metadata": {"error_type": "provider_unavailable"}}),
    }
    if fault not in simple:
        return None
    status, message, code, extra = simple[fault]
    return error_response(status, message, code, **extra)


async def inject(fault: str, arg: float | None, request: web.Request, model: str, messages: list[dict[str, Any]],
                 *, retry_after: float, hang_seconds: float, closing: asyncio.Event) -> web.StreamResponse:
    """Produce ``fault`` on the wire instead of an answer."""
    if (response := _simple(fault, arg if arg is not None else retry_after)) is not None:
        return response
    if fault in ("finish_error", "content_filter"):
        return _billed_failure(fault, model, messages)
    if fault == "truncated":
        full = orjson.dumps({"id": "gen-sim-t", "model": model, "choices": [{"index": 0, "message": {
            "role": "assistant", "content": "cut"}, "finish_reason": "stop"}]})
        return web.Response(body=full[: len(full) // 2], content_type="application/json")
    if fault == "reset":
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # nothing is sent: the client sees the connection drop
    if fault in ("hang", "stall_body"):
        stream = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "400"})
        if fault == "stall_body":
            await stream.prepare(request)
            await stream.write(b'{"id": "gen-sim-stall", "choices": [')
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), hang_seconds)
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError
    raise ValueError(f"unknown sim fault {fault!r}")
