"""sim_batch*.py: the simulator's OpenRouter Batch API, its timeline and its counters, over HTTP.

OpenAI's files + batches are in test_sim_batch_openai.py. Timings are scaled
down to tenths of a second; assertions are on what the server says and
counted, never on how long the client waited.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from batch.sim import SimConfig, Simulator, SimThread
from batch.sim_answers import answer_for, truncate, usage_for
from batch.sim_batch import NEXT, TERMINAL, Timeline

# Phases long enough that a 20 ms poll sees each one on a busy machine, short enough for a fast test.
FAST: dict[str, Any] = dict(batch_validating_seconds=0.25, batch_median_seconds=0.25, batch_spread=0.0,
                            batch_finalizing_seconds=0.25)
MODEL = "openai/gpt-4.1-mini"


def request_lines(n: int, prefix: str = "row", max_tokens: int | None = 6) -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}-{i}", "body": {"messages": [{"role": "user", "content": f"Say hello number {i} "
                                                                  "to the whole wide world"}],
                                                    **({"max_tokens": max_tokens} if max_tokens else {})}}
            for i in range(n)]


def submission(requests: list[dict[str, Any]], model: str = MODEL) -> bytes:
    return orjson.dumps({"endpoint": "/v1/chat/completions", "model": model, "requests": requests})


def expected_text(body: dict[str, Any]) -> str:
    return truncate(answer_for(body["messages"]), body.get("max_tokens"))[0]


async def call(s: aiohttp.ClientSession, method: str, url: str, data: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with s.request(method, url, data=data, headers=headers) as r:
        raw = await r.read()
        return r.status, (orjson.loads(raw) if r.content_type == "application/json" else raw)


async def poll(s: aiohttp.ClientSession, url: str, seen: list[str] | None = None) -> dict[str, Any]:
    """GET until terminal, noting each new status in ``seen`` (which starts with the create answer's
    status: that answer is the first observation, however short ``validating`` is)."""
    seen = [] if seen is None else seen
    while True:
        _, batch = await call(s, "GET", url)
        if not seen or seen[-1] != batch["status"]:
            seen.append(batch["status"])
        if batch["status"] in TERMINAL:
            return dict(batch)
        await asyncio.sleep(0.02)


class TestOpenRouter:
    def test_status_sequence_and_answers(self) -> None:
        """A batch goes validating, in_progress, finalizing, completed; lines answer as chat would, at half price."""
        async def go() -> None:
            async with Simulator(SimConfig(**FAST)) as sim, aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{sim.port}/api/v1/batches"
                requests = request_lines(12)
                status, created = await call(s, "POST", url, submission(requests))
                assert status == 202 and created["status"] == "validating" and created["results"] is None
                seen: list[str] = [created["status"]]
                batch = await poll(s, f"{url}/{created['id']}", seen)
                assert seen == ["validating", "in_progress", "finalizing", "completed"]
                assert batch["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
                assert batch["provider"] == "Sim" and batch["finalized_at"] is not None
                by_id = {r["custom_id"]: r for r in batch["results"]}
                assert len(by_id) == 12
                for req in requests:
                    line = by_id[req["custom_id"]]
                    body = line["response"]["body"]
                    assert line["error"] is None and line["id"].startswith("batch_req_")
                    assert body["id"].startswith("gen-batch-") and body["object"] == "chat.completion"
                    assert body["choices"][0]["message"]["content"] == expected_text(req["body"])
                    chat = usage_for(req["body"]["messages"], body["choices"][0]["message"]["content"], MODEL)
                    assert body["usage"]["cost"] == round(chat["cost"] * 0.5, 12)
                assert sim.batches is not None and batch["usage"]["cost"] == sim.batches.counters().cost > 0

        asyncio.run(go())

    def test_batch_line_answers_like_the_chat_endpoint(self) -> None:
        """A batch line and an online request for the same prompt (json_schema included) answer the same text."""
        schema = {"type": "object", "properties": {"label": {"enum": ["good", "bad"]}, "score": {"type": "integer"}}}
        body = {"messages": [{"role": "user", "content": "Rate this (good/bad): fine tea"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}}

        async def go() -> None:
            async with Simulator(SimConfig(**FAST, json_mode_only=(MODEL,))) as sim, aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{sim.port}/api/v1"
                lines = [{"custom_id": "a", "body": body}]
                _, created = await call(s, "POST", base + "/batches", submission(lines, model="sim/any"))
                _, refused = await call(s, "POST", base + "/batches", submission(lines))  # JSON mode only here
                batch = await poll(s, f"{base}/batches/{created['id']}")
                online_body = orjson.dumps({"model": "sim/any", **body})
                _, online = await call(s, "POST", base + "/chat/completions", online_body)
                text = batch["results"][0]["response"]["body"]["choices"][0]["message"]["content"]
                assert text == online["choices"][0]["message"]["content"] and orjson.loads(text)["label"]
                line = (await poll(s, f"{base}/batches/{refused['id']}"))["results"][0]
                assert line["response"] is None and "response_format" in line["error"]["message"]

        asyncio.run(go())

    def test_results_pages_return_each_line_once(self) -> None:
        """Paging /results with any limits yields every line exactly once, and a cursor always gives the same page."""
        with SimThread(SimConfig(**FAST)) as sim:
            url = f"http://127.0.0.1:{sim.sim.port}/api/v1/batches"

            async def setup() -> str:
                async with aiohttp.ClientSession() as s:
                    _, created = await call(s, "POST", url, submission(request_lines(37)))
                    await poll(s, f"{url}/{created['id']}")
                    return str(created["id"])

            batch_id = asyncio.run(setup())

            async def read_all(limits: list[int]) -> list[str]:
                ids: list[str] = []
                cursor: str | None = None
                async with aiohttp.ClientSession() as s:
                    for n in range(100):
                        query = f"?limit={limits[n % len(limits)]}" + (f"&cursor={cursor}" if cursor else "")
                        status, page = await call(s, "GET", f"{url}/{batch_id}/results{query}")
                        assert status == 200 and page["object"] == "list"
                        if cursor is not None:  # stable: the same cursor gives the same page
                            assert (await call(s, "GET", f"{url}/{batch_id}/results{query}"))[1] == page
                        ids += [line["custom_id"] for line in page["data"]]
                        cursor = page["next_cursor"]
                        assert page["has_more"] == (cursor is not None)
                        if cursor is None:
                            return ids
                raise AssertionError("paging did not end")

            @settings(max_examples=25, deadline=None)
            @given(st.lists(st.integers(1, 40), min_size=1, max_size=5))
            def check(limits: list[int]) -> None:
                ids = asyncio.run(read_all(limits))
                assert sorted(ids) == sorted(f"row-{i}" for i in range(37))

            check()

    def test_expiry_keeps_finished_lines_and_bills_them(self) -> None:
        """At the window, finished lines are returned and billed; the rest are batch_expired and unbilled."""
        cfg = SimConfig(**{**FAST, "batch_validating_seconds": 0.05, "batch_median_seconds": 1.0,
                           "batch_window_seconds": 0.45})

        async def go() -> None:
            async with Simulator(cfg) as sim, aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{sim.port}/api/v1/batches"
                _, created = await call(s, "POST", url, submission(request_lines(20)))
                seen: list[str] = [created["status"]]
                batch = await poll(s, f"{url}/{created['id']}", seen)
                assert seen == ["validating", "in_progress", "expired"]
                ok = [r for r in batch["results"] if r["response"] is not None]
                expired = [r for r in batch["results"] if r["error"] is not None]
                assert 0 < len(ok) < 20 and len(ok) + len(expired) == 20
                assert all(r["error"]["type"] == "batch_expired" and r["response"] is None for r in expired)
                assert batch["request_counts"] == {"total": 20, "completed": len(ok), "failed": len(expired)}
                billed = round(sum(r["response"]["body"]["usage"]["cost"] for r in ok), 12)
                assert sim.batches is not None
                counters = sim.batches.counters()
                assert batch["usage"]["cost"] == counters.cost == billed
                assert counters.lines_answered == len(ok) and counters.lines_expired == len(expired)

        asyncio.run(go())

    def test_line_failures_inside_a_completed_batch(self) -> None:
        """batch_line_failures fails a fixed share of lines with an error envelope; the batch still completes."""
        async def go() -> None:
            async with Simulator(SimConfig(**FAST, batch_line_failures=0.4, seed=3)) as sim, \
                    aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{sim.port}/api/v1/batches"
                _, created = await call(s, "POST", url, submission(request_lines(30)))
                batch = await poll(s, f"{url}/{created['id']}")
                failed = [r for r in batch["results"] if r["error"] is not None]
                assert batch["status"] == "completed" and batch["request_counts"]["failed"] == len(failed) > 0
                for r in failed:
                    assert r["response"] is None and set(r["error"]) >= {"type", "message", "param"}
                assert sim.batches is not None and sim.batches.counters().lines_failed == len(failed)

        asyncio.run(go())

    def test_submission_checks_answer_400_at_once(self) -> None:
        """Misordered or missing fields, 5,001 lines, a duplicate id, a second model, another endpoint: 400 at once."""
        one = request_lines(1)
        bad = [
            orjson.dumps({"requests": one, "endpoint": "/v1/chat/completions", "model": MODEL}),
            orjson.dumps({"endpoint": "/v1/chat/completions", "requests": one, "model": MODEL}),
            orjson.dumps({"endpoint": "/v1/chat/completions", "requests": one}),
            submission(request_lines(5_001)),
            submission(one + one),
            submission([{"custom_id": "x", "body": {"model": "other/model", "messages": []}}]),
            orjson.dumps({"endpoint": "/v1/embeddings", "model": MODEL, "requests": one}),
        ]

        async def go() -> None:
            async with Simulator(SimConfig(**FAST)) as sim, aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{sim.port}/api/v1/batches"
                answers = [await call(s, "POST", url, body) for body in bad]
                assert [status for status, _ in answers] == [400] * len(bad)
                assert "before 'requests'" in answers[0][1]["error"]["message"]
                assert "before 'requests'" in answers[2][1]["error"]["message"]  # missing reads as misordered
                assert "5,000" in answers[3][1]["error"]["message"]
                assert (await call(s, "POST", url, submission(request_lines(5_000))))[0] == 202
                assert sim.batches is not None and sim.batches.counters().batches == {"openrouter": 1}

        asyncio.run(go())

    def test_retired_model_fails_validation(self) -> None:
        """A batch for a retired model is accepted (202), then fails when validating ends, naming the model."""
        async def go() -> None:
            async with Simulator(SimConfig(**FAST, retired=("old/model",))) as sim, aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{sim.port}/api/v1/batches"
                status, created = await call(s, "POST", url, submission(request_lines(3), model="old/model"))
                seen: list[str] = [created["status"]]
                batch = await poll(s, f"{url}/{created['id']}", seen)
                assert status == 202 and seen == ["validating", "failed"]
                assert "old/model" in batch["error"]["message"] and batch["results"] == []

        asyncio.run(go())

    def test_list_delete_and_no_cancel_endpoint(self) -> None:
        """List is newest first without results and filters by status; delete needs a terminal batch; no cancel."""
        async def go() -> None:
            async with Simulator(SimConfig(**FAST)) as sim, aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{sim.port}/api/v1/batches"
                ids = [(await call(s, "POST", url, submission(request_lines(2, p))))[1]["id"] for p in "ab"]
                status, listing = await call(s, "GET", url + "?limit=1")
                assert status == 200 and [b["id"] for b in listing["data"]] == ids[::-1][:1] and listing["has_more"]
                _, rest = await call(s, "GET", f"{url}?after={listing['last_id']}")
                assert [b["id"] for b in rest["data"]] == ids[:1] and not rest["has_more"]
                assert all(b["results"] is None for b in listing["data"] + rest["data"])
                assert (await call(s, "DELETE", f"{url}/{ids[0]}"))[0] == 409
                assert (await call(s, "POST", f"{url}/{ids[0]}/cancel"))[0] == 404
                assert (await call(s, "POST", f"{url}/{ids[0]}"))[0] == 405
                await poll(s, f"{url}/{ids[0]}")
                _, done = await call(s, "GET", url + "?status=completed&status=expired")
                assert ids[0] in [b["id"] for b in done["data"]]
                assert {b["status"] for b in done["data"]} == {"completed"}
                assert (await call(s, "GET", url + "?status=finalizing"))[0] == 400  # not a filter
                status, deleted = await call(s, "DELETE", f"{url}/{ids[0]}")
                assert status == 200 and deleted["deletion"]["openrouter"] == "deleted"
                assert (await call(s, "GET", f"{url}/{ids[0]}"))[0] == 404
                assert sim.batches is not None and {"a-0", "a-1"} <= set(sim.batches.counters().answered)  # billed

        asyncio.run(go())

    def test_inline_results_beta_path_and_size_knobs(self) -> None:
        """batch_inline_results="completed" leaves an expired batch's lines to /results; the beta path is
        opt-in; a body over batch_max_bytes gets 413."""
        cfg = SimConfig(**{**FAST, "batch_window_seconds": 0.3, "batch_inline_results": "completed"})
        other = SimConfig(batch_beta_path=True, batch_max_bytes=2_000)

        async def go() -> None:
            async with Simulator(cfg) as sim, Simulator(other) as beta, aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{sim.port}/api/v1/batches"
                _, created = await call(s, "POST", url, submission(request_lines(4)))
                assert (await call(s, "GET", f"{url}/{created['id']}/results"))[0] == 409  # not terminal yet
                batch = await poll(s, f"{url}/{created['id']}")
                _, page = await call(s, "GET", f"{url}/{created['id']}/results")
                assert batch["status"] == "expired" and batch["results"] is None and len(page["data"]) == 4
                assert (await call(s, "POST", f"http://127.0.0.1:{sim.port}/api/beta/batches",
                                   submission(request_lines(1))))[0] == 404
                assert (await call(s, "POST", f"http://127.0.0.1:{beta.port}/api/beta/batches",
                                   submission(request_lines(1))))[0] == 202
                assert (await call(s, "POST", f"http://127.0.0.1:{beta.port}/api/v1/batches",
                                   submission(request_lines(40))))[0] == 413

        asyncio.run(go())


class TestShared:
    def test_api_key_guards_every_batch_route(self) -> None:
        """With api_key set, batch routes answer 401 with the chat endpoint's error body."""
        async def go() -> None:
            async with Simulator(SimConfig(api_key="k")) as sim, aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{sim.port}"
                _, chat = await call(s, "POST", base + "/v1/chat/completions", b"{}")
                for method, path in (("POST", "/api/v1/batches"), ("GET", "/api/v1/batches/x"),
                                     ("POST", "/v1/files"), ("GET", "/v1/batches")):
                    assert await call(s, method, base + path, b"{}") == (401, chat)
                ok = await call(s, "GET", base + "/api/v1/batches", headers={"Authorization": "Bearer k"})
                assert ok[0] == 200

        asyncio.run(go())

    def test_counters_in_sim_stats(self) -> None:
        """/_sim/stats counts batches per API, lines per custom_id (a resubmitted line shows 2) and cost."""
        async def go() -> None:
            async with Simulator(SimConfig(**FAST)) as sim, aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{sim.port}/api/v1/batches"
                first = (await call(s, "POST", url, submission(request_lines(3))))[1]
                second = (await call(s, "POST", url, submission(request_lines(1))))[1]
                for b in (first, second):
                    await poll(s, f"{url}/{b['id']}")
                _, stats = await call(s, "GET", f"http://127.0.0.1:{sim.port}/_sim/stats")
                batch = stats["batch"]
                assert batch["batches"] == {"openrouter": 2} and batch["lines_submitted"] == 4
                assert batch["submitted"] == {"row-0": 2, "row-1": 1, "row-2": 1}
                assert batch["answered"] == {"row-0": 2, "row-1": 1, "row-2": 1} and batch["cost"] > 0
                assert stats["requests"] == 0  # batch lines are not chat requests

        asyncio.run(go())


REACHABLE = {s: set(n) for s, n in NEXT.items()}
for _ in range(4):  # the transitive closure of the documented moves
    for s in REACHABLE:
        REACHABLE[s] |= {t for n in set(REACHABLE[s]) for t in REACHABLE.get(n, ())}

times = st.floats(0, 10, allow_nan=False)


class TestTimeline:
    @settings(max_examples=300)
    @given(times, times, times, st.floats(0.01, 10), st.booleans(), st.one_of(st.none(), times), times,
           st.lists(times, min_size=1, max_size=30), st.integers(1, 50))
    def test_any_poll_times_see_a_legal_sequence(self, validating: float, running: float, finalizing: float,
                                                 window: float, invalid: bool, cancel_at: float | None,
                                                 drain: float, polls: list[float], n: int) -> None:
        """Whatever the timeline and poll times, statuses follow the documented moves and done lines never shrink."""
        t = Timeline(validating, running, finalizing, window, invalid)
        if cancel_at is not None and t.status_at(cancel_at) not in TERMINAL:  # the API refuses later cancels
            t = Timeline(validating, running, finalizing, window, invalid, cancel_at, drain)
        polls.sort()
        statuses = [t.status_at(p) for p in polls]
        for a, b in zip(statuses, statuses[1:]):
            assert a == b or b in REACHABLE[a]
        done = [t.done_at(p, n) for p in polls]
        assert done == sorted(done) and all(0 <= d <= n for d in done)
        for p, status in zip(polls, statuses):
            if status in ("finalizing", "completed"):
                assert t.done_at(p, n) == n
