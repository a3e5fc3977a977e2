"""sim.py: the simulator answers like an OpenAI-compatible server, deterministically."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from batch.sim import SimConfig, Simulator
from batch.sim_answers import answer_for, count_tokens, truncate


async def post(url: str, payload: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url + "/chat/completions", data=orjson.dumps(payload),
                                                    headers=headers or {}) as r:
        return r.status, orjson.loads(await r.read())


def test_answers_are_deterministic_and_pick_offered_choices() -> None:
    """The same prompt gets the same answer; (a/b/c) choices are honoured."""
    m = [{"role": "user", "content": "Label this (positive/negative/neutral): great"}]
    assert answer_for(m) == answer_for(m) in {"positive", "negative", "neutral"}
    assert answer_for([{"role": "user", "content": "hello there"}]).startswith("sim ")


def test_max_tokens_truncates_with_length() -> None:
    """An answer longer than max_tokens is cut and marked finish_reason=length."""
    text, finish = truncate("one two three four", 2)
    assert (text, finish) == ("one two", "length")
    assert count_tokens("internationalization!") == 4  # 20 letters in pieces of 8, plus "!"


def test_chat_completion_shape_and_counters() -> None:
    """A request gets an OpenAI/OpenRouter-shaped reply, and the server counts it."""
    async def go() -> None:
        async with Simulator(SimConfig()) as sim:
            status, body = await post(sim.base_url, {"model": "openai/gpt-4.1-mini",
                                                     "messages": [{"role": "user", "content": "hi"}]})
            assert status == 200
            assert body["choices"][0]["message"]["role"] == "assistant"
            usage = body["usage"]
            assert usage["cost"] == pytest.approx((usage["prompt_tokens"] * 0.4 + usage["completion_tokens"] * 1.6) / 1e6)
            assert sim.counters.requests == 1 and sim.counters.by_model["openai/gpt-4.1-mini"] == 1

    asyncio.run(go())


def test_context_window_and_api_key() -> None:
    """Prompts over the window get 400 context_length_exceeded; a wrong key gets 401."""
    async def go() -> None:
        async with Simulator(SimConfig(context_windows={"small": 20}, api_key="k")) as sim:
            auth = {"Authorization": "Bearer k"}
            status, body = await post(sim.base_url, {"model": "small",
                                                     "messages": [{"role": "user", "content": "word " * 50}]}, auth)
            assert status == 400 and body["error"]["code"] == "context_length_exceeded"
            status, _ = await post(sim.base_url, {"model": "small", "messages": []}, {"Authorization": "Bearer no"})
            assert status == 401

    asyncio.run(go())
