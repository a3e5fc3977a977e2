"""batch_openai.py: OpenAI's files + batches client over HTTP against the simulator.

OpenRouter's client and the shared mappings are in test_batch_client.py.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from batch.batch_api import CLOCK_SKEW_SECONDS, BatchLimitError, Limits, OpenAIBatches, batch_failure, client_for
from batch.errors import FallbackError, RateLimited, RejectedError, TransientError
from batch.sim import SimConfig, Simulator
from batch.sim_answers import usage_for
from tests.test_batch_client import DEADLINE, FAST, collect, endpoint, expected, messages, rows, run, wait

MODEL = "gpt-4o-mini"


class TestOpenAIClient:
    def test_submit_poll_and_read_every_line(self) -> None:
        """Upload and create carry the model per line and the tag; every custom_id comes back once with its answer."""
        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openai"), endpoint(sim, prefix="/v1")
            info = await client.submit(s, ep, MODEL, rows(10), "tag-abc")
            assert info.api == "openai" and info.status == "validating" and info.tag == "tag-abc"
            seen: list[str] = []
            done = await wait(client, s, ep, info, seen)
            assert seen == ["validating", "in_progress", "finalizing", "completed"] and done.model == MODEL
            assert done.request_counts is not None and done.request_counts.total == 10 and done.finished_at
            lines = client.results(s, ep, done)
            got = await collect(lines)
            assert sorted(got) == sorted(cid for cid, _ in rows(10)) and lines.source == "files"
            for cid, line in got.items():
                assert line.reply is not None and line.reply.text == expected(cid, MODEL)[0]
                assert line.cost is None  # OpenAI bills tokens: the caller prices them at the batch price
                prefix, i = cid.rsplit("-", 1)
                usage = usage_for(messages(int(i), prefix), line.reply.text, MODEL)
                assert (line.reply.prompt_tokens, line.reply.completion_tokens) == (
                    usage["prompt_tokens"], usage["completion_tokens"])
            assert sim.batches is not None  # those tokens at half the chat price are what the sim billed
            assert sim.batches.counters().cost == pytest.approx(sum(expected(cid, MODEL)[1] for cid in got))
            assert done.usage is not None and done.usage.cost is None
            assert done.usage.completion_tokens == sum(x.reply.completion_tokens for x in got.values() if x.reply)
        run(SimConfig(**FAST), test)

    def test_input_file_sets_the_model_in_every_line(self) -> None:
        """Bodies without a model get it spliced in; a body with another model gets the batch's."""
        body = orjson.dumps({"model": "other", "messages": []})
        content = OpenAIBatches().input_file(MODEL, [("a", b'{"messages":[]}'), ("b", b"{}"), ("c", body)])
        lines = [orjson.loads(line) for line in content.splitlines()]
        assert [line["body"]["model"] for line in lines] == [MODEL] * 3
        assert list(lines[0]) == ["custom_id", "method", "url", "body"] and lines[0]["url"] == "/v1/chat/completions"

    @pytest.mark.parametrize("shape", ["response", "error", "mixed"])
    def test_both_error_shapes(self, shape: str) -> None:
        """Error-file lines in either shape are the online error classes; answered lines keep their answers."""
        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openai"), endpoint(sim, prefix="/v1")
            done = await wait(client, s, ep, await client.submit(s, ep, MODEL, rows(30), "t"))
            got = await collect(client.results(s, ep, done))
            failed = [x.error for x in got.values() if x.error is not None]
            assert len(got) == 30 and done.request_counts and done.request_counts.failed == len(failed) > 0
            assert {type(e) for e in failed} == {TransientError, RejectedError}
            assert all(x.reply.text == expected(x.custom_id, MODEL)[0] for x in got.values() if x.reply)
        run(SimConfig(**FAST, batch_line_failures=0.4, batch_error_shape=shape, seed=5), test)

    def test_expiry_gives_answers_and_expired_lines(self) -> None:
        """An expired batch's output file answers the finished lines; the rest are batch_expired errors."""
        cfg = SimConfig(**{**FAST, "batch_validating_seconds": 0.05, "batch_median_seconds": 1.0,
                           "batch_window_seconds": 0.45})

        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openai"), endpoint(sim, prefix="/v1")
            seen: list[str] = []
            done = await wait(client, s, ep, await client.submit(s, ep, MODEL, rows(20), "t"), seen)
            assert seen == ["validating", "in_progress", "expired"]
            got = await collect(client.results(s, ep, done))
            ok = [x for x in got.values() if x.ok]
            assert len(got) == 20 and 0 < len(ok) < 20
            assert all(x.error is not None and x.error.kind == "batch_expired" for x in got.values() if not x.ok)
        run(cfg, test)

    def test_cancel_drains_then_gives_partial_results(self) -> None:
        """Cancel holds the batch in cancelling, then cancelled; finished lines come back, unrun ones are absent."""
        cfg = SimConfig(**{**FAST, "batch_validating_seconds": 0.05, "batch_median_seconds": 2.0,
                           "batch_cancel_seconds": 0.3})

        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openai"), endpoint(sim, prefix="/v1")
            info = await client.submit(s, ep, MODEL, rows(40), "t")
            async with asyncio.timeout(DEADLINE):
                while (info := await client.get(s, ep, info.id)).status == "validating":
                    await asyncio.sleep(0.02)
            assert info.status == "in_progress" and await client.cancel(s, ep, info.id) is True
            seen: list[str] = []
            done = await wait(client, s, ep, await client.get(s, ep, info.id), seen)
            assert seen == ["cancelling", "cancelled"]
            got = await collect(client.results(s, ep, done))
            assert done.request_counts is not None and 0 < len(got) == done.request_counts.completed < 40
            assert all(x.ok for x in got.values())  # lines a cancel kept from running are in no file
            assert await client.cancel(s, ep, info.id) is False  # terminal: nothing to cancel
            assert sim.batches is not None and sim.batches.counters().cancels == 1
        run(cfg, test)

    def test_retired_model_fails_the_batch(self) -> None:
        """A batch for a retired model is accepted, then fails with the simulator's message: no_batch_endpoint."""
        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openai"), endpoint(sim, prefix="/v1")
            seen: list[str] = []
            done = await wait(client, s, ep, await client.submit(s, ep, "old-model", rows(2), "t"), seen)
            assert seen == ["validating", "failed"] and done.error and "old-model" in done.error
            assert done.error_code == "model_not_found"
            failure = batch_failure(done)
            assert isinstance(failure, FallbackError) and failure.kind == "no_batch_endpoint"
            assert await collect(client.results(s, ep, done)) == {}
        run(SimConfig(**FAST, retired=("old-model",)), test)

    def test_enqueued_token_limit_is_a_rate_limit(self) -> None:
        """A batch over the enqueued-token cap fails later; batch_failure calls it a rate limit, to submit again."""
        cfg = SimConfig(**{**FAST, "batch_median_seconds": 5.0, "batch_enqueued_token_limit": 200})

        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openai"), endpoint(sim, prefix="/v1")
            await client.submit(s, ep, MODEL, rows(8), "t")
            done = await wait(client, s, ep, await client.submit(s, ep, MODEL, rows(8, "more"), "t"))
            failure = batch_failure(done)
            assert isinstance(failure, RateLimited) and failure.kind == "batch_token_limit"
        run(cfg, test)

    def test_find_by_tag_after_a_lost_answer(self) -> None:
        """A batch whose create answer was lost is found by the tag in its metadata, and only that one."""
        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openai"), endpoint(sim, prefix="/v1")
            start = time.time()
            lost = (await client.submit(s, ep, MODEL, rows(3), "tag-lost")).id  # the answer "lost"
            for n in range(3):
                await client.submit(s, ep, MODEL, rows(3, f"x{n}"), f"tag-{n}")
            found = await client.find(s, ep, model=MODEL, tag="tag-lost", created_after=start - CLOCK_SKEW_SECONDS,
                                      total=3)
            assert [b.id for b in found] == [lost] and found[0].tag == "tag-lost"
            assert await client.find(s, ep, model=MODEL, tag="tag-none", created_after=start, total=3) == []
        run(SimConfig(**FAST), test)

    def test_limits_refuse_before_uploading(self) -> None:
        """Over 50,000 lines submit refuses without an upload; the provider's "File is too large." is rejected."""
        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openai"), endpoint(sim, prefix="/v1")
            assert client.limits == Limits(50_000, 200_000_000)
            with pytest.raises(BatchLimitError, match="50,000"):
                await client.submit(s, ep, MODEL, rows(50_001), "t")
            with pytest.raises(BatchLimitError, match="bytes"):
                await client_for("openai", limits=Limits(10, 500)).submit(s, ep, MODEL, rows(10), "t")
            assert sim.batches is not None and sim.batches.counters().files == 0
            with pytest.raises(RejectedError, match="too large"):
                await client.submit(s, ep, MODEL, rows(40), "t")
            assert sim.batches.counters().batches == {}
        run(SimConfig(**FAST, batch_max_bytes=3_000), test)
