"""An OpenAI-compatible chat-completions server for tests, demos and CI.

It imitates what batch meets on the wire from OpenRouter and OpenAI, on
127.0.0.1, with no key and no cost, including the unkind parts:

- ``POST /v1/chat/completions`` (also under ``/api/v1``) answers
  deterministically from the prompt (``batch.sim_answers``): offered
  ``(a/b/c)`` choices, JSON instances of a requested schema, ``max_tokens``
  truncation with ``finish_reason: "length"``, usage and OpenRouter's
  ``usage.cost``.
- Limits over sliding windows of any length, counted at arrival, with each
  provider's way of saying so (``batch.sim_limits``).
- Models that cannot answer and injected faults (``batch.sim_faults``).
- ``GET /v1/models`` lists models with ``context_length`` and per-token
  ``pricing`` strings, as OpenRouter does.
- ``GET /_sim/stats`` returns what the server counted (``SimCounters``).

It does **not** imitate streaming, tools, real model quality, or provider
routing beyond OpenRouter's ``models`` fallback list. The server counts what
it saw so tests can assert server-side facts instead of timings.

Use::

    async with Simulator(SimConfig(latency_ms=20)) as sim:
        ...  # sim.base_url == "http://127.0.0.1:PORT/v1"

    with SimThread(SimConfig()) as sim:   # from synchronous code and tests
        ...
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from batch.catalog import SIM_FAULTS as FAULTS
from batch.catalog import facts_for
from batch.sim_answers import (DEFAULT_PRICES, answer_for, invalid_version, prompt_key, structured_answer, truncate,
                               usage_for)
from batch.sim_faults import (BILLED_FAULTS, ODD_REPLIES, echo_key, error_response, fault_draw, inject, odd_reply,
                              pick_fault, unavailable)
from batch.sim_limits import LimitGate, refusal_response

DEFAULT_CONTEXT_WINDOW = 32_768
RATE_LIMIT_STYLES = ("openai", "openrouter", "bare")


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
        requests_per_minute, tokens_per_minute: limits over a sliding window of ``window_seconds``
            (tokens = prompt + completion, as usage reports them), counted when a request
            arrives; requests refused with 429 do not count.
        limit_windows: shorter windows over which the same limits are also enforced, pro rata
            (e.g. [1] enforces 1/60 of a per-minute limit in every second, as OpenAI may).
        rate_limit_style: "openai" (x-ratelimit-* headers on every response, limit and wait
            stated in 429 messages, no Retry-After), "openrouter" (no headers on success; 429s
            carry X-RateLimit-* and Retry-After) or "bare" (429 with Retry-After only).
        report_cost: include ``usage.cost`` as OpenRouter does (False: as OpenAI, tokens only).
        json_mode_only: models that, like gpt-3.5-turbo, take response_format json_object but refuse
            json_schema (400), and say so in GET /models supported_parameters.
        invalid_answers: probability that an answer is invalid for its format: "unsure" instead of
            one of the offered (a/b/c) choices, or JSON cut short. Drawn per (seed, prompt, nth request).
        odd_replies: probability per answer of each odd but real-world reply shape (``ODD_REPLIES``):
            content as a list of parts, numbers as strings, content that is not text, integers beyond
            64 bits in a JSON answer, usage of the wrong shape. Drawn per (seed, prompt, nth request).
        echo_key: repeat the request's API key in every error message, as some proxies do ("full"),
            or masked as OpenAI does ("masked": sk-abc****wxyz); "" repeats nothing.
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
    limit_windows: tuple[float, ...] = ()
    rate_limit_style: str = "openai"
    report_cost: bool = True
    invalid_answers: float = 0.0
    json_mode_only: tuple[str, ...] = ()
    echo_key: str = ""
    odd_replies: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind in self.faults:
            if kind not in FAULTS:
                raise ValueError(f"unknown sim fault {kind!r}; known: {', '.join(FAULTS)}")
        for kind in self.odd_replies:
            if kind not in ODD_REPLIES:
                raise ValueError(f"unknown odd reply {kind!r}; known: {', '.join(ODD_REPLIES)}")
        if self.echo_key not in ("", "full", "masked"):
            raise ValueError(f"echo_key must be full, masked or empty, not {self.echo_key!r}")
        if self.rate_limit_style not in RATE_LIMIT_STYLES:
            raise ValueError(f"rate_limit_style must be openai, openrouter or bare, not {self.rate_limit_style!r}")

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
    by_prompt: Counter[str] = field(default_factory=Counter)  # hash of the conversation (prompt_key)
    statuses: Counter[int] = field(default_factory=Counter)
    in_flight: int = 0
    peak_in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    after_success: Counter[str] = field(default_factory=Counter)  # requests for a prompt already answered ok
    arrivals: dict[str, list[float]] = field(default_factory=dict)  # only with record_times
    rate_limited: int = 0  # 429s sent because a limit was reached (not injected faults)
    too_large: int = 0  # 429 "Request too large": one request over the whole token limit
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)  # budget -> window length -> most admitted
    admissions: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens); only with record_times
    refusals: list[float] = field(default_factory=list)  # times of limit 429s; only with record_times
    invalid_answers: int = 0  # answers made invalid on purpose (invalid_answers)
    odd_replies: Counter[str] = field(default_factory=Counter)  # odd reply shapes sent (odd_replies)
    billed_usd: float = 0.0  # what the replies' usage.cost added up to: answers and partly billed failures

    def peak(self, budget: str, seconds: float | None = None) -> int:
        """The most admitted in any window of ``seconds`` (default: the main window)."""
        windows = self.peaks.get(budget, {})
        if seconds is None:
            return max(windows.values(), default=0) if budget == "offered" else next(iter(windows.values()), 0)
        return windows.get(f"{seconds:g}", 0)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot (``GET /_sim/stats``)."""
        return {
            "requests": self.requests, "by_model": dict(self.by_model), "statuses": dict(self.statuses),
            "faults": dict(self.faults), "rate_limited": self.rate_limited, "too_large": self.too_large,
            "duplicates_after_success": sum(self.after_success.values()),
            "peak_in_flight": self.peak_in_flight, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "peaks": self.peaks,
            "admissions": self.admissions, "refusals": self.refusals, "invalid_answers": self.invalid_answers,
            "odd_replies": dict(self.odd_replies), "billed_usd": self.billed_usd,
        }


class Simulator:
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
        self._closing = asyncio.Event()
        cfg = self.config
        limits = {"requests": cfg.requests_per_minute, "tokens": cfg.tokens_per_minute}
        self._gate = LimitGate({k: float(v) for k, v in limits.items() if v}, cfg.window_seconds,
                               cfg.limit_windows)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for prefix in ("/v1", "/api/v1"):
            app.router.add_post(prefix + "/chat/completions", self._chat)
            app.router.add_get(prefix + "/models", self._models)
        app.router.add_get("/_sim/stats", self._stats)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        server = site._server
        assert server is not None and hasattr(server, "sockets")
        self.port = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._closing.set()  # release hanging handlers
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- facts -----------------------------------------------------------------

    def response_formats(self, model: str) -> tuple[str, ...]:
        """What response_format types a model accepts: json_mode_only, else the catalog, else both."""
        if model in self.config.json_mode_only:
            return ("json_object",)
        facts = facts_for(model)
        return facts.response_formats if facts else ("json_schema", "json_object")

    def context_window(self, model: str) -> int:
        if model in self.config.context_windows:
            return self.config.context_windows[model]
        facts = facts_for(model)
        return facts.context_window if facts else DEFAULT_CONTEXT_WINDOW

    # --- handlers --------------------------------------------------------------

    async def _stats(self, request: web.Request) -> web.Response:
        self.counters.peaks = self._gate.peaks()
        return web.Response(body=orjson.dumps(self.counters.as_dict(), option=orjson.OPT_NON_STR_KEYS),
                            content_type="application/json")

    async def _models(self, request: web.Request) -> web.Response:
        names = self.config.models or ("openai/gpt-3.5-turbo",)
        data = []
        for name in names:
            facts = facts_for(name)
            p_in, p_out = (facts.price_input_per_million, facts.price_output_per_million) if facts else DEFAULT_PRICES
            params = ["max_tokens", "temperature", "seed", "stop", "response_format"]
            if "json_schema" in self.response_formats(name):
                params.append("structured_outputs")
            data.append({
                "id": name,
                "context_length": self.context_window(name),
                "supported_parameters": params,
                "pricing": {"prompt": f"{p_in / 1e6:.10f}", "completion": f"{p_out / 1e6:.10f}"},
            })
        return web.Response(body=orjson.dumps({"data": data}), content_type="application/json")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        c = self.counters
        c.requests += 1
        c.in_flight += 1
        c.peak_in_flight = max(c.peak_in_flight, c.in_flight)
        try:
            response = await self._answer(request)
        finally:
            c.in_flight -= 1
            c.peaks = self._gate.peaks()
        c.statuses[response.status] += 1
        if self.config.echo_key and isinstance(response, web.Response):
            response = echo_key(response, request.headers.get("Authorization", ""), self.config.echo_key)
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        arrived = time.monotonic()
        if cfg.api_key is not None and request.headers.get("Authorization") != f"Bearer {cfg.api_key}":
            return error_response(401, "No auth credentials found or the key is invalid", 401)
        try:
            body = orjson.loads(await request.read())
            model = body["model"]
            messages = body["messages"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return error_response(400, "request body must be JSON with model and messages", 400)
        key = self._note_arrival(messages, arrived)
        nth = self._seen[key]
        self._seen[key] += 1
        answer = structured_answer(messages, body) or answer_for(messages)
        if cfg.invalid_answers and fault_draw(cfg.seed + 1, key, nth) < cfg.invalid_answers:
            self.counters.invalid_answers += 1
            answer = invalid_version(answer)
        text, finish = truncate(answer, body.get("max_tokens"))
        usage = usage_for(messages, text, model)
        headers: dict[str, str] | None = None
        if self._gate.active:  # a gateway counts requests when they arrive, before any latency
            refused, headers = self._admit(model, usage["total_tokens"], arrived)
            if refused is not None:
                return refused
        elif cfg.record_times:
            self.counters.admissions.append((arrived, usage["total_tokens"]))
        delay = cfg.latency_ms + (self._rng.uniform(-1, 1) * cfg.latency_jitter_ms if cfg.latency_jitter_ms else 0)
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        model, refusal = self._route(model, messages, body)
        if refusal is not None:
            return refusal
        fault, arg = pick_fault(cfg.faults, cfg.schedule, cfg.seed, model, key, nth)
        if fault is not None:
            self.counters.faults[fault] += 1
            if fault in BILLED_FAULTS:
                self.counters.billed_usd += usage_for(messages, "par", model)["cost"]
            return await inject(fault, arg, request, model, messages, retry_after=cfg.retry_after_seconds,
                                hang_seconds=cfg.hang_seconds, closing=self._closing)
        return self._reply(key, nth, model, text, finish, usage, headers)

    def _note_arrival(self, messages: list[dict[str, Any]], now: float) -> str:
        """Count a request for its prompt; returns the prompt's key."""
        c = self.counters
        if self._first_request is None:
            self._first_request = now
        key = prompt_key(messages)
        c.by_prompt[key] += 1
        if key in self._succeeded:
            c.after_success[key] += 1
        if self.config.record_times:
            c.arrivals.setdefault(key, []).append(now)
        return key

    def _route(self, model: str, messages: list[dict[str, Any]], body: dict[str, Any]
               ) -> tuple[str, web.Response | None]:
        """OpenRouter's ``models`` list: the first model that can answer does; else the last refusal."""
        cfg = self.config
        refusal: web.Response | None = None
        for candidate in [model, *[m for m in body.get("models") or () if m != model]]:
            self.counters.by_model[candidate] += 1
            down = time.monotonic() - (self._first_request or 0.0) < cfg.down.get(candidate, 0.0)
            refusal = unavailable(candidate, retired=candidate in cfg.retired,
                                  exists=not cfg.models or candidate in cfg.models, down=down,
                                  formats=self.response_formats(candidate), window=self.context_window(candidate),
                                  messages=messages, body=body)
            if refusal is None:
                return candidate, None
        return model, refusal

    def _reply(self, key: str, nth: int, model: str, text: str, finish: str, usage: dict[str, Any],
               headers: dict[str, str] | None) -> web.Response:
        self._succeeded.add(key)
        self.counters.prompt_tokens += usage["prompt_tokens"]
        self.counters.completion_tokens += usage["completion_tokens"]
        self.counters.billed_usd += usage["cost"]
        self._serial += 1
        if not self.config.report_cost:
            usage = {k: v for k, v in usage.items() if k != "cost"}
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
        cfg = self.config
        odd, _ = pick_fault(cfg.odd_replies, {}, cfg.seed + 2, model, key, nth) if cfg.odd_replies else (None, None)
        if odd is not None:
            self.counters.odd_replies[odd] += 1
            return web.Response(body=odd_reply(odd, reply), content_type="application/json", headers=headers)
        return web.Response(body=orjson.dumps(reply), content_type="application/json", headers=headers)

    def _admit(self, model: str, tokens: int, now: float) -> tuple[web.Response | None, dict[str, str] | None]:
        """Enforce the limits; returns (429 response or None, headers for a success)."""
        c = self.counters
        refusal = self._gate.admit({"requests": 1, "tokens": tokens}, now)
        style = self.config.rate_limit_style
        if refusal is None:
            if self.config.record_times:
                c.admissions.append((now, tokens))
            return None, (self._gate.headers(now) if style == "openai" else None)
        if refusal.too_large:
            c.too_large += 1
        else:
            c.rate_limited += 1
            if self.config.record_times:
                c.refusals.append(now)
        return refusal_response(model, refusal, style, self._gate.headers(now)), None


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
