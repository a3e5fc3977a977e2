"""sim_batch*.py: the simulator's OpenAI files + batches over HTTP (OpenRouter's API: test_sim_batch.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from batch.sim import SimConfig, Simulator
from tests.test_sim_batch import FAST, call, expected_text, poll

CHAT = "/v1/chat/completions"


def input_lines(n: int, model: str = "gpt-4o-mini", prefix: str = "row") -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": CHAT,
             "body": {"model": model, "max_tokens": 5,
                      "messages": [{"role": "user", "content": f"Tell me about item {i} in a few words"}]}}
            for i in range(n)]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


async def upload(s: aiohttp.ClientSession, base: str, content: bytes) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", content, filename="input.jsonl", content_type="application/jsonl")
    async with s.post(base + "/v1/files", data=form) as r:
        return r.status, await r.json()


async def submit(s: aiohttp.ClientSession, base: str, rows: list[dict[str, Any]] | bytes,
                 **fields: Any) -> dict[str, Any]:
    """Upload ``rows`` and create a batch on them; the create call must succeed whatever the file holds."""
    status, f = await upload(s, base, rows if isinstance(rows, bytes) else jsonl(rows))
    assert status == 200 and f["purpose"] == "batch"
    body = {"input_file_id": f["id"], "endpoint": CHAT, "completion_window": "24h", **fields}
    status, batch = await call(s, "POST", base + "/v1/batches", orjson.dumps(body))
    assert status == 200 and batch["status"] == "validating", batch
    return dict(batch)


async def file_lines(s: aiohttp.ClientSession, base: str, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    status, raw = await call(s, "GET", f"{base}/v1/files/{file_id}/content")
    assert status == 200
    return [orjson.loads(line) for line in raw.splitlines()]


class TestOpenAIBatches:
    def test_status_sequence_files_and_answers(self) -> None:
        """Upload, create, poll through every status; the output file answers each custom_id as chat would."""
        async def go() -> None:
            async with Simulator(SimConfig(**FAST)) as sim, aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{sim.port}"
                rows = input_lines(10)
                created = await submit(s, base, rows, metadata={"job": "t"})
                assert created["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
                seen: list[str] = [created["status"]]
                batch = await poll(s, f"{base}/v1/batches/{created['id']}", seen)
                assert seen == ["validating", "in_progress", "finalizing", "completed"]
                assert all(batch[k] is not None for k in ("in_progress_at", "finalizing_at", "completed_at"))
                assert batch["cancelled_at"] is None and batch["metadata"] == {"job": "t"}
                assert batch["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
                assert batch["error_file_id"] is None
                out = {line["custom_id"]: line for line in await file_lines(s, base, batch["output_file_id"])}
                assert len(out) == 10
                for row in rows:
                    line = out[row["custom_id"]]
                    assert line["error"] is None and line["response"]["status_code"] == 200
                    body = line["response"]["body"]
                    assert body["choices"][0]["message"]["content"] == expected_text(row["body"])
                    assert "cost" not in body["usage"]  # OpenAI reports tokens, not cost
                usage = batch["usage"]
                assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
                assert sim.batches is not None and sim.batches.counters().cost > 0

        asyncio.run(go())

    def test_cancel_drains_then_yields_partial_results(self) -> None:
        """A cancel holds the batch in cancelling while lines in flight finish, then cancelled with partial output."""
        cfg = SimConfig(**{**FAST, "batch_validating_seconds": 0.05, "batch_median_seconds": 2.0,
                           "batch_cancel_seconds": 0.3})

        async def go() -> None:
            async with Simulator(cfg) as sim, aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{sim.port}"
                created = await submit(s, base, input_lines(40))
                url = f"{base}/v1/batches/{created['id']}"
                await asyncio.sleep(0.4)
                status, cancelling = await call(s, "POST", url + "/cancel")
                assert status == 200 and cancelling["status"] == "cancelling" and cancelling["cancelling_at"]
                seen: list[str] = [created["status"]]
                batch = await poll(s, url, seen)
                assert seen[-2:] == ["cancelling", "cancelled"] and batch["cancelled_at"] is not None
                done = batch["request_counts"]["completed"]
                assert cancelling["request_counts"]["completed"] < done < 40  # drained, not finished
                out = await file_lines(s, base, batch["output_file_id"])
                assert len(out) == done and batch["error_file_id"] is None  # unrun lines are in no file
                assert (await call(s, "POST", url + "/cancel"))[0] == 400  # terminal: nothing to cancel
                assert sim.batches is not None
                counters = sim.batches.counters()
                assert counters.cancels == 1 and counters.lines_cancelled == 40 - done
                assert counters.lines_answered == done

        asyncio.run(go())

    def test_expiry_keeps_finished_lines_and_expires_the_rest(self) -> None:
        """At the window, finished lines stay in the output file (billed) and the rest are batch_expired errors."""
        cfg = SimConfig(**{**FAST, "batch_validating_seconds": 0.05, "batch_median_seconds": 1.0,
                           "batch_window_seconds": 0.45})

        async def go() -> None:
            async with Simulator(cfg) as sim, aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{sim.port}"
                created = await submit(s, base, input_lines(20))
                seen: list[str] = [created["status"]]
                batch = await poll(s, f"{base}/v1/batches/{created['id']}", seen)
                assert seen == ["validating", "in_progress", "expired"] and batch["expired_at"] is not None
                out = await file_lines(s, base, batch["output_file_id"])
                errors = await file_lines(s, base, batch["error_file_id"])
                assert 0 < len(out) < 20 and len(out) + len(errors) == 20
                assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errors)
                assert batch["request_counts"] == {"total": 20, "completed": len(out), "failed": len(errors)}
                assert batch["usage"]["output_tokens"] == sum(o["response"]["body"]["usage"]["completion_tokens"]
                                                              for o in out)
                assert sim.batches is not None and sim.batches.counters().lines_expired == len(errors)

        asyncio.run(go())

    @pytest.mark.parametrize("shape", ["response", "error"])
    def test_line_errors_in_a_completed_batch(self, shape: str) -> None:
        """Failed lines go to the error file in the shape batch_error_shape picks; the batch still completes."""
        cfg = SimConfig(**FAST, batch_line_failures=0.4, batch_error_shape=shape, seed=5)

        async def go() -> None:
            async with Simulator(cfg) as sim, aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{sim.port}"
                created = await submit(s, base, input_lines(30))
                batch = await poll(s, f"{base}/v1/batches/{created['id']}")
                errors = await file_lines(s, base, batch["error_file_id"])
                out = await file_lines(s, base, batch["output_file_id"])
                assert batch["status"] == "completed" and 0 < len(errors) == batch["request_counts"]["failed"]
                assert len(out) + len(errors) == 30
                for e in errors:
                    if shape == "response":
                        assert e["error"] is None and e["response"]["status_code"] in (400, 500)
                        assert e["response"]["body"]["error"]["message"]
                    else:
                        assert e["response"] is None and set(e["error"]) == {"code", "message"}

        asyncio.run(go())

    @pytest.mark.parametrize("rows, code, line", [
        (input_lines(2) + input_lines(1), "duplicate_custom_id", 3),
        (input_lines(2) + input_lines(1, model="gpt-4o", prefix="x"), "mismatched_model", 3),
        ([{**input_lines(1)[0], "url": "/v1/embeddings"}], "invalid_url", 1),
        (jsonl(input_lines(1)) + b"{not json\n", "invalid_json_line", 2),
        (jsonl(input_lines(1)) * 50_001, "too_many_requests", None),
        (input_lines(2, model="old-model"), "model_not_found", None),
    ])
    def test_validation_failures_fail_the_batch_later(self, rows: Any, code: str, line: int | None) -> None:
        """The create call succeeds; the batch then fails with errors.data naming the code and line."""
        async def go() -> None:
            async with Simulator(SimConfig(**FAST, retired=("old-model",))) as sim, aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{sim.port}"
                created = await submit(s, base, rows)
                seen: list[str] = [created["status"]]
                batch = await poll(s, f"{base}/v1/batches/{created['id']}", seen)
                assert seen == ["validating", "failed"] and batch["failed_at"] is not None
                first = batch["errors"]["data"][0]
                assert (first["code"], first["line"]) == (code, line) and first["message"]
                if code == "model_not_found":
                    assert "old-model" in first["message"]
                assert batch["output_file_id"] is None and batch["request_counts"]["total"] == 0

        asyncio.run(go())

    def test_enqueued_token_limit_fails_a_later_batch(self) -> None:
        """Over batch_enqueued_token_limit, the create call succeeds and the batch fails with token_limit_exceeded."""
        cfg = SimConfig(**{**FAST, "batch_median_seconds": 5.0, "batch_enqueued_token_limit": 300})

        async def go() -> None:
            async with Simulator(cfg) as sim, aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{sim.port}"
                first = await submit(s, base, input_lines(10))  # 160 prompt tokens: fits
                second = await submit(s, base, input_lines(10, prefix="more"))
                other = await submit(s, base, input_lines(10, model="gpt-4o"))  # the cap is per model
                failed = await poll(s, f"{base}/v1/batches/{second['id']}")
                assert failed["status"] == "failed"
                assert failed["errors"]["data"][0]["code"] == "token_limit_exceeded"
                assert "Enqueued token limit reached for gpt-4o-mini" in failed["errors"]["data"][0]["message"]
                for b in (first, other):  # still queued or running, not failed
                    assert (await call(s, "GET", f"{base}/v1/batches/{b['id']}"))[1]["status"] in (
                        "validating", "in_progress")

        asyncio.run(go())

    def test_upload_limit_create_checks_and_listing(self) -> None:
        """Over batch_max_bytes an upload gets 400 "File is too large."; bad creates 400; list is newest first."""
        async def go() -> None:
            async with Simulator(SimConfig(**FAST, batch_max_bytes=2_000)) as sim, aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{sim.port}"
                status, body = await upload(s, base, b"x" * 2_001)
                assert status == 400 and body["error"]["message"] == "File is too large."
                assert body["error"]["type"] == "invalid_request_error"
                ids = [(await submit(s, base, input_lines(2)))["id"] for _ in range(3)]
                f = sim.batches.batches[ids[0]].extra["input_file_id"] if sim.batches else ""
                for bad in ({"input_file_id": "file-nope", "endpoint": CHAT, "completion_window": "24h"},
                            {"input_file_id": f, "endpoint": "/v1/embeddings", "completion_window": "24h"},
                            {"input_file_id": f, "endpoint": CHAT, "completion_window": "1h"}):
                    assert (await call(s, "POST", base + "/v1/batches", orjson.dumps(bad)))[0] == 400
                _, page = await call(s, "GET", base + "/v1/batches?limit=2")
                assert [b["id"] for b in page["data"]] == ids[::-1][:2] and page["has_more"]
                _, rest = await call(s, "GET", f"{base}/v1/batches?after={page['last_id']}")
                assert [b["id"] for b in rest["data"]] == ids[:1] and not rest["has_more"]
                assert (await call(s, "GET", base + "/v1/batches/batch_nope"))[0] == 404
                assert sim.batches is not None and sim.batches.counters().batches == {"openai": 3}

        asyncio.run(go())
