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
- OpenRouter's and OpenAI's asynchronous Batch APIs (batch/sim_batch_http.py).

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
from typing import Any

import orjson
from aiohttp import web

from batch.sim_answers import (answer_for, invalid_version, prompt_key, sim_prices, structured_answer, truncate,
                               usage_for)
from batch.sim_config import SimConfig, SimCounters
from batch.catalog import FLEX_PRICE_FACTOR
from batch.sim_faults import (BILLED_FAULTS, echo_key, error_response, fault_draw, flex_refusal, inject, odd_reply,
                              pick_fault, unavailable)
from batch.sim_batch import BatchBook
from batch.sim_batch_http import add_batch_routes
from batch.sim_limits import LimitGate, refusal_response

__all__ = ["SimConfig", "SimCounters", "SimThread", "Simulator", "serve"]



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
        self.batches: BatchBook | None = None  # the Batch APIs' batches, files and counters; made by app()
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
        self.batches = add_batch_routes(app, self.config, self.batches)
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

    # --- handlers --------------------------------------------------------------

    async def _stats(self, request: web.Request) -> web.Response:
        self.counters.peaks = self._gate.peaks()
        stats = self.counters.as_dict()
        if self.batches is not None:
            stats["batch"] = self.batches.counters().as_dict()
        return web.Response(body=orjson.dumps(stats, option=orjson.OPT_NON_STR_KEYS),
                            content_type="application/json")

    async def _models(self, request: web.Request) -> web.Response:
        names = self.config.listed_models()
        data = []
        for name in names:
            p_in, p_out = sim_prices(name)
            params = ["max_tokens", "temperature", "seed", "stop", "response_format"]
            if "json_schema" in self.config.response_formats(name):
                params.append("structured_outputs")
            data.append({
                "id": name,
                "context_length": self.config.context_window(name),
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
        flex = body.get("service_tier") == "flex"
        if flex and cfg.flex_refusals and fault_draw(cfg.seed + 3, key, nth) < cfg.flex_refusals:
            self.counters.flex_refusals += 1
            return flex_refusal(cfg.rate_limit_style, cfg.retry_after_seconds)
        fault, arg = pick_fault(cfg.faults, cfg.schedule, cfg.seed, model, key, nth)
        if fault is not None:
            self.counters.faults[fault] += 1
            if fault in BILLED_FAULTS:
                self.counters.billed_usd += usage_for(messages, "par", model)["cost"]
            return await inject(fault, arg, request, model, messages, retry_after=cfg.retry_after_seconds,
                                hang_seconds=cfg.hang_seconds, closing=self._closing)
        if flex:  # billed at the Batch API rate (WIRE-BATCH.md C1)
            usage["cost"] = round(usage["cost"] * FLEX_PRICE_FACTOR, 12)
        return self._reply(key, nth, model, text, finish, usage, headers, "flex" if flex else "default")

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
            refusal = unavailable(candidate, retired=cfg.is_retired(candidate),
                                  exists=not cfg.models or candidate in cfg.models, down=down,
                                  formats=self.config.response_formats(candidate), window=self.config.context_window(candidate),
                                  messages=messages, body=body, endpoints=candidate not in cfg.no_endpoints)
            if refusal is None:
                return candidate, None
        return model, refusal

    def _reply(self, key: str, nth: int, model: str, text: str, finish: str, usage: dict[str, Any],
               headers: dict[str, str] | None, tier: str = "default") -> web.Response:
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
            "service_tier": tier,
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
