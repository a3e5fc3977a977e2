"""An OpenAI-compatible chat-completions server for tests, demos and CI.

It imitates what batch meets on the wire from OpenRouter and OpenAI, on
127.0.0.1, with no key and no cost:

- ``POST /v1/chat/completions`` (also under ``/api/v1``) answers
  deterministically from the prompt: if the last user message offers choices
  as ``(a/b/c)`` it picks one by a hash of the message, else it answers
  ``"sim <hash> <first words>"``. ``max_tokens`` truncates the answer and sets
  ``finish_reason: "length"``.
- Structured answers: a model the catalog knows without structured outputs
  (gpt-3.5-turbo) refuses ``json_schema`` with a 400, as OpenAI does. With ``response_format`` ``json_schema`` (or a message
  that says ``JSON schema: {...}``, as batch's [output_format] instruction
  does) it answers a JSON instance of the schema, its values derived from the
  prompt; with ``json_object`` alone, ``{"answer": ...}``. ``invalid_answers``
  makes that share of answers invalid (a label outside the choices, broken
  JSON), so repair paths can be exercised.
- ``usage`` counts tokens with a stand-in tokenizer (words split into pieces
  of at most eight characters, each punctuation mark one token, plus OpenAI's
  per-message framing: 4 per message, 3 for the reply). On the demo reviews
  it counts 5% more than OpenAI's cl100k_base encoding, and reports ``usage.cost`` as OpenRouter does, from
  the built-in price table (unknown models: $1 / $2 per million).
- ``GET /v1/models`` lists models with ``context_length`` and per-token
  ``pricing`` strings, as OpenRouter does.
- ``GET /_sim/stats`` returns what the server counted (``SimCounters``).
- OpenRouter's and OpenAI's asynchronous Batch APIs: batch/sim_batch.py.

It does **not** imitate streaming, tools, real model quality, or provider
routing beyond OpenRouter's ``models`` fallback list. Knobs (``SimConfig``) add
latency and faults (see ``FAULTS``), each by probability or by a per-model
schedule; a fault is chosen from a hash of (seed, prompt, how often that prompt
was seen), so a row meets the same faults whatever order requests arrive in.
The server counts what it saw (``SimCounters``) so tests can assert
server-side facts instead of timings.

Use::

    async with Simulator(SimConfig(latency_ms=20)) as sim:
        ...  # sim.base_url == "http://127.0.0.1:PORT/v1"

    with SimThread(SimConfig()) as sim:   # from synchronous code and tests
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from batch.catalog import SIM_FAULTS as FAULTS
from batch.catalog import facts_for

if TYPE_CHECKING:
    from batch.sim_batch import BatchBook

DEFAULT_CONTEXT_WINDOW = 32_768
DEFAULT_PRICES = (1.0, 2.0)  # USD per million input / output tokens
_TOKEN_RE = re.compile(r"\w{1,8}|[^\w\s]")
_CHOICES_RE = re.compile(r"\(([\w-]+(?:/[\w-]+)+)\)")


@dataclass(slots=True)
class SimConfig:
    """What the simulator does; every field has a safe default.

    Attributes:
        latency_ms: mean delay before each answer.
        latency_jitter_ms: uniform +/- spread around the mean.
        seed: seeds every random choice, so a run is reproducible.
        api_key: when set, requests must carry ``Bearer <api_key>`` (else 401).
        context_windows: per-model context window (default: the catalog, else 32,768).
        models: when non-empty, the only models that exist (others get 404).
        faults: probability per request of each fault in ``FAULTS``, e.g. {"500": 0.05}.
        schedule: per model (or "*"), faults for the 1st, 2nd, ... request of each
            prompt, e.g. {"*": ["429:0.3", "ok"]}; "kind:x" sets that fault's
            Retry-After to x seconds.
        down: model -> seconds, counted from the first request, during which it answers 503 (inf: always).
        retired: models that answer 404 ``model_deprecated``.
        retry_after_seconds: Retry-After sent with 429 and 503 faults.
        hang_seconds: how long a "hang" or "stall_body" fault holds the connection.
        record_times: keep every request's arrival time per prompt (for retry-timing tests).
        requests_per_minute, tokens_per_minute: limits over a true sliding window of
            ``window_seconds`` (tokens = prompt + completion, as usage reports them);
            requests refused with 429 do not count.
        report_cost: include ``usage.cost`` as OpenRouter does (False: as OpenAI, tokens only).
        json_mode_only: models that, like gpt-3.5-turbo, take response_format json_object but refuse
            json_schema (400), and say so in GET /models supported_parameters.
        invalid_answers: probability that an answer is invalid for its format: "unsure" instead of
            one of the offered (a/b/c) choices, or JSON cut short. Drawn per (seed, prompt, nth request).
        rate_limit_style: "openai" (x-ratelimit-* headers on every response, the limit
            stated in 429 messages), "openrouter" (no headers on success; 429s carry
            X-RateLimit-* and Retry-After) or "bare" (429 with Retry-After only).
        batch_*: the Batch APIs (batch/sim_batch.py), in wall-clock seconds:
        batch_validating_seconds: time a batch spends in ``validating``.
        batch_median_seconds, batch_spread: a batch's time in ``in_progress`` is log-normal with this
            median and sigma, drawn per batch from the seed (defaults: 7 min, 90% within an hour, as
            observed on OpenRouter); its lines finish evenly over that time. 0 spread: always the median.
        batch_finalizing_seconds: time in ``finalizing``.
        batch_window_seconds: the completion window; lines not finished by then expire (batch_expired).
        batch_cancel_seconds: time an OpenAI batch stays ``cancelling`` (finishing lines in flight).
        batch_line_failures: share of lines that fail, drawn per (seed, custom_id).
        batch_error_shape: how an OpenAI error-file line reports a failure: "response" (status_code
            4xx/5xx with body.error), "error" (response null, error {code, message}) or "mixed" (per line).
        batch_price_factor: batch price as a share of the chat price.
        batch_max_bytes: largest OpenAI upload / OpenRouter batch body (OpenAI: 400 "File is too large.").
        batch_enqueued_token_limit: OpenAI's per-model cap on prompt tokens in unfinished batches; a batch
            over it is accepted, then fails with token_limit_exceeded. None: no cap.
        batch_inline_results: when OpenRouter's GET batch carries ``results``: "terminal" (any terminal
            status, the current reference) or "completed" (only completed, as in the beta).
        batch_beta_path: also serve OpenRouter's batches under /api/beta/batches.
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    seed: int = 0
    api_key: str | None = None
    context_windows: dict[str, int] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    faults: dict[str, float] = field(default_factory=dict)
    schedule: dict[str, list[str]] = field(default_factory=dict)
    down: dict[str, float] = field(default_factory=dict)
    retired: tuple[str, ...] = ()
    retry_after_seconds: float = 1.0
    hang_seconds: float = 600.0
    record_times: bool = False
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    window_seconds: float = 60.0
    rate_limit_style: str = "openai"
    report_cost: bool = True
    invalid_answers: float = 0.0
    json_mode_only: tuple[str, ...] = ()
    batch_validating_seconds: float = 2.0
    batch_median_seconds: float = 420.0
    batch_spread: float = 1.68
    batch_finalizing_seconds: float = 2.0
    batch_window_seconds: float = 86_400.0
    batch_cancel_seconds: float = 60.0
    batch_line_failures: float = 0.0
    batch_error_shape: str = "mixed"
    batch_price_factor: float = 0.5
    batch_max_bytes: int = 200 * 1024 * 1024
    batch_enqueued_token_limit: int | None = None
    batch_inline_results: str = "terminal"
    batch_beta_path: bool = False

    def __post_init__(self) -> None:
        for kind in self.faults:
            if kind not in FAULTS:
                raise ValueError(f"unknown sim fault {kind!r}; known: {', '.join(FAULTS)}")
        if self.rate_limit_style not in ("openai", "openrouter", "bare"):
            raise ValueError(f"rate_limit_style must be openai, openrouter or bare, not {self.rate_limit_style!r}")
        if self.batch_error_shape not in ("response", "error", "mixed"):
            raise ValueError(f"batch_error_shape must be response, error or mixed, not {self.batch_error_shape!r}")
        if self.batch_inline_results not in ("terminal", "completed"):
            raise ValueError(f"batch_inline_results must be terminal or completed, not {self.batch_inline_results!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SimConfig:
        """Build from a job's ``[sim]`` table (already validated by job.py)."""
        known = {k: v for k, v in options.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(slots=True)
class SimCounters:
    """What the server received and sent; read them after (or during) a run."""

    requests: int = 0
    by_model: Counter[str] = field(default_factory=Counter)
    by_prompt: Counter[str] = field(default_factory=Counter)  # hash of the last message
    statuses: Counter[int] = field(default_factory=Counter)
    in_flight: int = 0
    peak_in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    after_success: Counter[str] = field(default_factory=Counter)  # requests for a prompt already answered ok
    arrivals: dict[str, list[float]] = field(default_factory=dict)  # only with record_times
    rate_limited: int = 0  # 429s sent because a limit was reached (not injected faults)
    peak_requests_window: int = 0  # most requests admitted in any window
    peak_tokens_window: int = 0
    peak_offered_window: int = 0  # most requests *received* (admitted or refused) in any window
    admissions: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens); only with record_times
    refusals: list[float] = field(default_factory=list)  # times of limit 429s; only with record_times
    invalid_answers: int = 0  # answers made invalid on purpose (invalid_answers)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot (``GET /_sim/stats``)."""
        return {
            "requests": self.requests, "by_model": dict(self.by_model), "statuses": dict(self.statuses),
            "faults": dict(self.faults), "rate_limited": self.rate_limited,
            "duplicates_after_success": sum(self.after_success.values()),
            "peak_in_flight": self.peak_in_flight, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "peak_requests_window": self.peak_requests_window,
            "peak_tokens_window": self.peak_tokens_window, "peak_offered_window": self.peak_offered_window,
            "admissions": self.admissions, "refusals": self.refusals, "invalid_answers": self.invalid_answers,
        }


class SlidingWindow:
    """Amounts admitted in the last ``window`` seconds, exactly (a deque of events)."""

    __slots__ = ("limit", "window", "events", "total", "peak")

    def __init__(self, limit: float, window: float) -> None:
        self.limit = limit
        self.window = window
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0
        self.peak = 0

    def _expire(self, now: float) -> None:
        events = self.events
        while events and events[0][0] <= now - self.window:
            self.total -= events.popleft()[1]

    def wait_for(self, now: float, amount: int) -> float:
        """0 if ``amount`` fits now, else seconds until enough of the window has expired."""
        self._expire(now)
        excess = self.total + amount - self.limit
        if excess <= 0:
            return 0.0
        for t, a in self.events:
            excess -= a
            if excess <= 0:
                return max(0.001, t + self.window - now)
        return self.window  # larger than the whole limit: never fits

    def add(self, now: float, amount: int) -> None:
        self.events.append((now, amount))
        self.total += amount
        self.peak = max(self.peak, self.total)

    def reset_in(self, now: float) -> float:
        return max(0.0, self.events[0][0] + self.window - now) if self.events else 0.0


def count_tokens(text: str) -> int:
    """The simulator's stand-in tokenizer (see the module docstring)."""
    return len(_TOKEN_RE.findall(text))


def _conversation(messages: list[dict[str, Any]]) -> str:
    """Every non-system message's text: a plain prompt is its one user message; a repair
    conversation (answer, then a correction) differs per row even when the correction does not."""
    texts = []
    for m in messages:
        if m.get("role") == "system":
            continue
        content = m.get("content")
        texts.append(content if isinstance(content, str) else orjson.dumps(content).decode())
    return "\x1e".join(texts)


def prompt_key(messages: list[dict[str, Any]]) -> str:
    """The key under which the simulator counts a prompt: its conversation without system messages."""
    return hashlib.blake2b(_conversation(messages).encode(), digest_size=8).hexdigest()


def answer_for(messages: list[dict[str, Any]]) -> str:
    """The deterministic answer to a prompt, before any max_tokens truncation."""
    last = ""
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            last = m["content"]
            break
    digest = hashlib.blake2b(_conversation(messages).encode(), digest_size=8).digest()
    choices = _CHOICES_RE.search(last)
    if choices:
        options = choices.group(1).split("/")
        return options[int.from_bytes(digest[:4], "big") % len(options)]
    words = " ".join(last.split()[:6])
    return f"sim {digest.hex()[:8]} {words}".strip()


_SCHEMA_MARK = "JSON schema:"


def structured_answer(messages: list[dict[str, Any]], body: Mapping[str, Any]) -> str | None:
    """The JSON answer when the request asks for one (see the module docstring), else None."""
    fmt = body.get("response_format") if isinstance(body.get("response_format"), dict) else {}
    schema = (fmt.get("json_schema") or {}).get("schema") if fmt.get("type") == "json_schema" else None
    if schema is None:
        for m in messages:
            content = m.get("content")
            if isinstance(content, str) and _SCHEMA_MARK in content:
                with contextlib.suppress(orjson.JSONDecodeError, ValueError):
                    text = content.split(_SCHEMA_MARK, 1)[1]
                    schema = orjson.loads(text[text.index("{"):text.rindex("}") + 1])
    last = next((m["content"] for m in reversed(messages)
                 if m.get("role") == "user" and isinstance(m.get("content"), str)), "")
    if isinstance(schema, dict):
        return orjson.dumps(instance_of(schema, last, "$")).decode()
    if fmt.get("type") == "json_object":
        return orjson.dumps({"answer": answer_for(messages)}).decode()
    return None


def instance_of(schema: Mapping[str, Any], prompt: str, path: str) -> Any:
    """A deterministic value that follows ``schema``, drawn from a hash of the prompt and the path."""
    h = int.from_bytes(hashlib.blake2b(f"{path}:{prompt}".encode(), digest_size=8).digest(), "big")
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][h % len(schema["enum"])]
    t = schema.get("type")
    t = t[0] if isinstance(t, list) else t
    if t == "object":
        return {k: instance_of(sub, prompt, f"{path}.{k}") for k, sub in (schema.get("properties") or {}).items()}
    if t == "array":
        n = max(schema.get("minItems", 1), min(schema.get("maxItems", 3), 1 + h % 3))
        return [instance_of(schema.get("items") or {"type": "string"}, prompt, f"{path}[{i}]") for i in range(n)]
    if t in ("integer", "number"):
        lo = schema.get("minimum", 0)
        hi = schema.get("maximum", lo + 100)
        value = lo + h % (int(hi - lo) + 1)
        return value if t == "integer" else float(value)
    if t == "boolean":
        return bool(h & 1)
    if t == "null":
        return None
    words = prompt.split() or ["sim"]
    return words[h % len(words)].strip(".,!?;:\"'()")[: schema.get("maxLength", 40)] or "sim"


def invalid_version(answer: str) -> str:
    """What a model that ignores the format answers instead: prose, or JSON cut short."""
    if answer.lstrip().startswith(("{", "[")):
        return answer[: max(1, len(answer) // 2)]
    return "unsure"


def truncate(text: str, max_tokens: int | None) -> tuple[str, str]:
    """Cut ``text`` to ``max_tokens`` sim tokens; returns (text, finish_reason)."""
    if max_tokens is None:
        return text, "stop"
    pieces = list(_TOKEN_RE.finditer(text))
    if len(pieces) <= max_tokens:
        return text, "stop"
    end = pieces[max_tokens - 1].end() if max_tokens > 0 else 0
    return text[:end], "length"


def usage_for(messages: list[dict[str, Any]], completion: str, model: str) -> dict[str, Any]:
    prompt = 3
    for m in messages:
        content = m.get("content")
        text = content if isinstance(content, str) else orjson.dumps(content).decode()
        prompt += 4 + count_tokens(text)
    completion_tokens = count_tokens(completion)
    facts = facts_for(model)
    p_in, p_out = (facts.price_input_per_million, facts.price_output_per_million) if facts else DEFAULT_PRICES
    cost = (prompt * p_in + completion_tokens * p_out) / 1_000_000
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "cost": round(cost, 12),
    }


def _error(status: int, message: str, code: Any, headers: Mapping[str, str] | None = None,
           **extra: Any) -> web.Response:
    body = {"error": {"code": code, "message": message, **extra}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json",
                        headers=headers)


def _fault_draw(seed: int, key: str, nth: int) -> float:
    h = hashlib.blake2b(f"{seed}:{key}:{nth}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


class _Faults:
    """Fault selection and injection, mixed into Simulator."""

    config: SimConfig
    _first_request: float | None
    _closing: asyncio.Event | None

    def _unavailable(self, model: str, messages: list[dict[str, Any]], body: dict[str, Any]
                     ) -> web.StreamResponse | None:
        cfg = self.config
        if model in cfg.retired:
            return _error(404, f"{model} has been retired", 404, availability={
                "code": "model_deprecated", "retryable": False, "requested_models": [model]})
        if cfg.models and model not in cfg.models:
            return _error(404, f"model {model} does not exist", 404, availability={
                "code": "model_not_found", "retryable": False, "requested_models": [model]})
        if time.monotonic() - (self._first_request or 0.0) < cfg.down.get(model, 0.0):
            return _error(503, f"{model} is down", 503, headers={"Retry-After": "0"},
                          metadata={"error_type": "provider_unavailable"})
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") not in (*self._response_formats(model), "text"):
            return _error(400, f"Invalid parameter: 'response_format' of type '{fmt.get('type')}' is not "
                          "supported with this model.", "invalid_request_error")
        window = self._context_window(model)  # type: ignore[attr-defined]
        prompt = usage_for(messages, "", model)["prompt_tokens"]
        if prompt + (body.get("max_tokens") or 0) > window:
            return _error(400, f"This model's maximum context length is {window} tokens. "
                          f"However, you requested {prompt} tokens.", "context_length_exceeded")
        return None

    def _fault_for(self, model: str, key: str, nth: int) -> tuple[str | None, float | None]:
        cfg = self.config
        plan = cfg.schedule.get(model) or cfg.schedule.get("*")
        if plan is not None and nth < len(plan):
            kind, _, arg = plan[nth].partition(":")
            return (None if kind == "ok" else kind), (float(arg) if arg else None)
        if cfg.faults:
            u = _fault_draw(cfg.seed, key, nth)
            for kind, p in cfg.faults.items():
                if u < p:
                    return kind, None
                u -= p
        return None, None

    async def _inject(self, fault: str, arg: float | None, request: web.Request, model: str,
                      messages: list[dict[str, Any]]) -> web.StreamResponse:
        wait = arg if arg is not None else self.config.retry_after_seconds
        if fault == "429":
            return _error(429, "Rate limit exceeded", "rate_limit_exceeded", headers={"Retry-After": f"{wait:g}"})
        if fault == "insufficient_quota":
            return _error(429, "You exceeded your current quota", "insufficient_quota", type="insufficient_quota")
        if fault in ("500", "502", "504"):
            return _error(int(fault), "upstream error", int(fault))
        if fault == "503":
            return _error(503, "overloaded", 503, headers={"Retry-After": f"{wait:g}"})
        if fault == "401":
            return _error(401, "No auth credentials found", 401)
        if fault == "402":
            return _error(402, "Insufficient credits", 402)
        if fault == "error_in_200":
            return _error(200, "Provider returned error", 502, metadata={"error_type": "provider_unavailable"})
        if fault in ("finish_error", "content_filter"):
            usage = usage_for(messages, "par", model)
            choice = {"index": 0, "message": {"role": "assistant", "content": "par"}, "finish_reason":
                      "error" if fault == "finish_error" else "content_filter"}
            if fault == "finish_error":
                choice["error"] = {"code": 502, "message": "upstream stopped mid-answer"}
            reply = {"id": "gen-sim-err", "model": model, "choices": [choice], "usage": usage}
            return web.Response(body=orjson.dumps(reply), content_type="application/json")
        if fault == "truncated":
            full = orjson.dumps({"id": "gen-sim-t", "model": model, "choices": [{"index": 0, "message": {
                "role": "assistant", "content": "cut"}, "finish_reason": "stop"}]})
            return web.Response(body=full[: len(full) // 2], content_type="application/json")
        if fault == "reset":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing is sent: the client sees the connection drop
        if fault in ("hang", "stall_body"):
            response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "400"})
            if fault == "stall_body":
                await response.prepare(request)
                await response.write(b'{"id": "gen-sim-stall", "choices": [')
            assert self._closing is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.config.hang_seconds)
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        raise ValueError(f"unknown sim fault {fault!r}")


class Simulator(_Faults):
    """The server; an async context manager bound to 127.0.0.1 on a free port."""

    def __init__(self, config: SimConfig | None = None, *, port: int = 0, host: str = "127.0.0.1") -> None:
        self.config = config or SimConfig()
        self.counters = SimCounters()
        self.host = host
        self.port = port
        self._rng = random.Random(self.config.seed)
        self._runner: web.AppRunner | None = None
        self._serial = 0
        self._seen: Counter[str] = Counter()  # requests per prompt, to index schedules
        self._succeeded: set[str] = set()
        self._first_request: float | None = None
        self._closing: asyncio.Event | None = None
        cfg = self.config
        w = cfg.window_seconds
        self._rpm = SlidingWindow(cfg.requests_per_minute, w) if cfg.requests_per_minute else None
        self._tpm = SlidingWindow(cfg.tokens_per_minute, w) if cfg.tokens_per_minute else None
        self._offered = SlidingWindow(float("inf"), w)
        self.batches: BatchBook | None = None  # the Batch APIs' batches, files and counters; made by app()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for prefix in ("/v1", "/api/v1"):
            app.router.add_post(prefix + "/chat/completions", self._chat)
            app.router.add_get(prefix + "/models", self._models)
        app.router.add_get("/_sim/stats", self._stats)
        from batch.sim_batch_http import add_batch_routes  # here: that module imports this one

        self.batches = add_batch_routes(app, self.config, self.batches)
        return app

    async def start(self) -> None:
        self._closing = asyncio.Event()
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        server = site._server
        assert server is not None and hasattr(server, "sockets")
        self.port = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._closing is not None:
            self._closing.set()  # release hanging handlers
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- handlers --------------------------------------------------------------

    async def _stats(self, request: web.Request) -> web.Response:
        stats = self.counters.as_dict()
        if self.batches is not None:
            stats["batch"] = self.batches.counters().as_dict()
        return web.Response(body=orjson.dumps(stats, option=orjson.OPT_NON_STR_KEYS),
                            content_type="application/json")

    async def _models(self, request: web.Request) -> web.Response:
        names = self.config.models or ("openai/gpt-3.5-turbo",)
        data = []
        for name in names:
            facts = facts_for(name)
            p_in, p_out = (facts.price_input_per_million, facts.price_output_per_million) if facts else DEFAULT_PRICES
            params = ["max_tokens", "temperature", "seed", "stop", "response_format"]
            if "json_schema" in self._response_formats(name):
                params.append("structured_outputs")
            data.append({
                "id": name,
                "context_length": self._context_window(name),
                "supported_parameters": params,
                "pricing": {"prompt": f"{p_in / 1e6:.10f}", "completion": f"{p_out / 1e6:.10f}"},
            })
        return web.Response(body=orjson.dumps({"data": data}), content_type="application/json")

    def _response_formats(self, model: str) -> tuple[str, ...]:
        """What response_format types a model accepts: json_mode_only, else the catalog, else both."""
        if model in self.config.json_mode_only:
            return ("json_object",)
        facts = facts_for(model)
        return facts.response_formats if facts else ("json_schema", "json_object")

    def _context_window(self, model: str) -> int:
        if model in self.config.context_windows:
            return self.config.context_windows[model]
        facts = facts_for(model)
        return facts.context_window if facts else DEFAULT_CONTEXT_WINDOW

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        c = self.counters
        c.requests += 1
        c.in_flight += 1
        c.peak_in_flight = max(c.peak_in_flight, c.in_flight)
        try:
            response = await self._answer(request)
        finally:
            c.in_flight -= 1
        c.statuses[response.status] += 1
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        if cfg.api_key is not None and request.headers.get("Authorization") != f"Bearer {cfg.api_key}":
            return _error(401, "No auth credentials found or the key is invalid", 401)
        try:
            body = orjson.loads(await request.read())
            model = body["model"]
            messages = body["messages"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _error(400, "request body must be JSON with model and messages", 400)
        c = self.counters
        if self._first_request is None:
            self._first_request = time.monotonic()
        key = prompt_key(messages)
        c.by_prompt[key] += 1
        if key in self._succeeded:
            c.after_success[key] += 1
        if cfg.record_times:
            c.arrivals.setdefault(key, []).append(time.monotonic())
        nth = self._seen[key]
        self._seen[key] += 1
        delay = cfg.latency_ms + (self._rng.uniform(-1, 1) * cfg.latency_jitter_ms if cfg.latency_jitter_ms else 0)
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        candidates = [model, *[m for m in body.get("models") or () if m != model]]
        refusal: web.StreamResponse | None = None
        for model in candidates:  # OpenRouter's `models`: the first that can answer does
            c.by_model[model] += 1
            refusal = self._unavailable(model, messages, body)
            if refusal is None:
                break
        if refusal is not None:
            return refusal
        fault, arg = self._fault_for(model, key, nth)
        if fault is not None:
            c.faults[fault] += 1
            return await self._inject(fault, arg, request, model, messages)
        answer = structured_answer(messages, body) or answer_for(messages)
        if cfg.invalid_answers and _fault_draw(cfg.seed + 1, key, nth) < cfg.invalid_answers:
            c.invalid_answers += 1
            answer = invalid_version(answer)
        text, finish = truncate(answer, body.get("max_tokens"))
        usage = usage_for(messages, text, model)
        if not cfg.report_cost:
            del usage["cost"]
        headers: dict[str, str] | None = None
        if cfg.record_times and self._rpm is None and self._tpm is None:
            c.admissions.append((time.monotonic(), usage["total_tokens"]))
        if self._rpm is not None or self._tpm is not None:
            refused, headers = self._admit(model, usage["total_tokens"])
            if refused is not None:
                return refused
        self._succeeded.add(key)
        self.counters.prompt_tokens += usage["prompt_tokens"]
        self.counters.completion_tokens += usage["completion_tokens"]
        self._serial += 1
        reply = {
            "id": f"gen-sim-{self._serial}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "provider": "Sim",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "native_finish_reason": finish,
            }],
            "usage": usage,
        }
        return web.Response(body=orjson.dumps(reply), content_type="application/json", headers=headers)

    def _admit(self, model: str, tokens: int) -> tuple[web.Response | None, dict[str, str] | None]:
        """Enforce the sliding-window limits; returns (429 response or None, headers for a success)."""
        now = time.monotonic()
        c = self.counters
        self._offered.add(now, 1)
        c.peak_offered_window = self._offered.peak
        self._offered._expire(now)
        wait_r = self._rpm.wait_for(now, 1) if self._rpm else 0.0
        wait_t = self._tpm.wait_for(now, tokens) if self._tpm else 0.0
        style = self.config.rate_limit_style
        if wait_r or wait_t:
            c.rate_limited += 1
            if self.config.record_times:
                c.refusals.append(now)
            scope, window = ("requests", self._rpm) if wait_r >= wait_t else ("tokens", self._tpm)
            assert window is not None
            wait = max(wait_r, wait_t)
            unit = "RPM" if scope == "requests" else "TPM"
            msg = (f"Rate limit reached for {model} on {scope} per min ({unit}): Limit {window.limit:g}, "
                   f"Used {window.total}, Requested {1 if scope == 'requests' else tokens}. "
                   f"Please try again in {wait:.3f}s.") if style == "openai" else "Rate limit exceeded"
            headers = {"Retry-After": f"{wait:.3f}"}
            if style == "openai":
                headers.update(self._limit_headers(now))
            elif style == "openrouter":
                headers.update({"X-RateLimit-Limit": f"{window.limit:g}", "X-RateLimit-Remaining": "0",
                                "X-RateLimit-Reset": str(int((time.time() + wait) * 1000))})
            return _error(429, msg, "rate_limit_exceeded", headers=headers, type=scope), None
        if self.config.record_times:
            c.admissions.append((now, tokens))
        if self._rpm:
            self._rpm.add(now, 1)
            c.peak_requests_window = self._rpm.peak
        if self._tpm:
            self._tpm.add(now, tokens)
            c.peak_tokens_window = self._tpm.peak
        return None, (self._limit_headers(now) if style == "openai" else None)

    def _limit_headers(self, now: float) -> dict[str, str]:
        h = {}
        for name, window in (("requests", self._rpm), ("tokens", self._tpm)):
            if window is not None:
                h[f"x-ratelimit-limit-{name}"] = f"{window.limit:g}"
                h[f"x-ratelimit-remaining-{name}"] = f"{max(0, window.limit - window.total):g}"
                h[f"x-ratelimit-reset-{name}"] = f"{window.reset_in(now) * 1000:.0f}ms"
        return h


class SimThread:
    """Runs a Simulator on its own event loop in a daemon thread.

    For synchronous callers: tests that drive ``batch run`` as a subprocess,
    notebooks. ``counters`` are plain ints and Counters updated on the
    server's loop; read them after the work you measure has finished.
    """

    def __init__(self, config: SimConfig | None = None, *, port: int = 0) -> None:
        self.sim = Simulator(config, port=port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="batch-sim", daemon=True)

    @property
    def base_url(self) -> str:
        return self.sim.base_url

    @property
    def counters(self) -> SimCounters:
        return self.sim.counters

    @property
    def config(self) -> SimConfig:
        return self.sim.config

    def __enter__(self) -> SimThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.sim.start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.sim.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


async def serve(config: SimConfig, port: int) -> None:
    """Run until cancelled (``batch sim``)."""
    async with Simulator(config, port=port) as sim:
        print(f"batch sim listening on {sim.base_url}  (Ctrl-C stops)", flush=True)
        await asyncio.Event().wait()
