"""OpenAI Batch files in (custom_id, method, url, body per line) and Batch output lines out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow.dataset as ds
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch.errors import JobError
from batch.job import load_job
from batch.plan import fingerprint
from batch.prompts import PromptBuilder
from batch.sim import SimThread
from batch.sim_answers import answer_for, truncate
from batch.sources import MISSING, RowBatch
from tests.conftest import run_cli, write_job, write_jsonl

LINES = 3000
BATCH_INPUT = {"template": None, "id_column": None}  # write_job's template defaults, dropped


def batch_line(i: int, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"Is item {i} any good? (yes/no/maybe)"}]
    return {"custom_id": f"task-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": messages, "temperature": 0, **body}}


def parse_output_file(path: Path) -> list[dict[str, Any]]:
    """Read a Batch output file the way OpenAI documents it: one JSON object per line."""
    lines = []
    for raw in path.read_bytes().splitlines():
        line = orjson.loads(raw)
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert line["id"].startswith("batch_req_")
        lines.append(line)
    return lines


class TestBatchFileRun:
    def test_a_batch_file_runs_and_exports_one_line_per_custom_id(self, tmp_path: Path, sim: SimThread) -> None:
        lines = [batch_line(i, max_tokens=50 if i % 3 else 1) for i in range(LINES)]
        data = write_jsonl(tmp_path / "batch-input.jsonl", lines)
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, input=BATCH_INPUT,
                        request={"max_tokens": 2}, run={"concurrency": 32})
        proc = run_cli("run", str(job), "--quiet")
        assert proc.returncode == 0, proc.stderr
        assert sim.counters.requests == LINES
        assert sim.counters.by_model == {"openai/gpt-4.1-mini": LINES}  # the job's chain replaced body.model

        export = tmp_path / "batch-output.jsonl"
        proc = run_cli("export", str(tmp_path / "out"), "--format", "openai-batch", str(export))
        assert proc.returncode == 0, proc.stderr
        out = parse_output_file(export)
        assert sorted(x["custom_id"] for x in out) == sorted(x["custom_id"] for x in lines)
        assert len({x["id"] for x in out}) == LINES
        by_id = {x["custom_id"]: x for x in out}
        for line in lines[::7]:
            got = by_id[line["custom_id"]]
            assert got["error"] is None
            assert got["response"]["status_code"] == 200
            body = got["response"]["body"]
            assert body["object"] == "chat.completion"
            # the line's own max_tokens wins over the job's [request] default of 2
            expected, finish = truncate(answer_for(line["body"]["messages"]), line["body"]["max_tokens"])
            assert body["choices"][0]["message"]["content"] == expected
            assert body["choices"][0]["finish_reason"] == finish
            usage = body["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    def test_raw_bodies_are_exported_as_received_and_errors_go_to_their_own_file(
            self, tmp_path: Path, sim_factory: Any) -> None:
        sim = sim_factory(context_windows={"openai/gpt-4.1-mini": 60})
        lines = [batch_line(i) for i in range(50)]
        lines[7]["body"]["messages"][0]["content"] = "word " * 200  # over the 60-token window: an error row
        data = write_jsonl(tmp_path / "in.jsonl", lines)
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, input=BATCH_INPUT,
                        output={"raw_response": True})
        assert run_cli("run", str(job), "--quiet").returncode == 1
        table = ds.dataset(tmp_path / "out" / "results").to_table()
        assert "response_body" in table.column_names
        ok_path, err_path = tmp_path / "ok.jsonl", tmp_path / "errors.jsonl"
        proc = run_cli("export", str(tmp_path / "out"), str(ok_path), "--errors", str(err_path))
        assert proc.returncode == 0, proc.stderr
        ok, errors = parse_output_file(ok_path), parse_output_file(err_path)
        assert len(ok) == 49 and [e["custom_id"] for e in errors] == ["task-7"]
        assert errors[0]["response"] is None
        assert errors[0]["error"]["code"] == "context_length"
        raw = {r["id"]: orjson.loads(r["response_body"]) for r in table.to_pylist() if r["status"] == "ok"}
        for line in ok:
            body = line["response"]["body"]
            assert body == raw[line["custom_id"]]
            assert body["id"].startswith("gen-sim-") and body["provider"] == "Sim"  # the sim's own reply

    def test_body_model_keep_starts_each_line_at_its_own_model(self, tmp_path: Path, sim_factory: Any) -> None:
        sim = sim_factory(retired=("old-model",))
        lines = [batch_line(i) for i in range(30)]
        for i, line in enumerate(lines):
            if i % 3 == 1:
                line["body"]["model"] = "old-model"  # retired: falls back to the job's chain
            elif i % 3 == 2:
                del line["body"]["model"]  # none: the job's chain is the default
        data = write_jsonl(tmp_path / "in.jsonl", lines)
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url,
                        input={**BATCH_INPUT, "body_model": "keep"})
        proc = run_cli("validate", str(job))
        assert "gpt-4o-mini (10 lines)" in proc.stdout and "old-model (10 lines)" in proc.stdout
        assert run_cli("run", str(job), "--quiet").returncode == 0
        rows = {r["id"]: r for r in ds.dataset(tmp_path / "out" / "results").to_table().to_pylist()}
        for i in range(30):
            r = rows[f"task-{i}"]
            want = ("gpt-4o-mini", 0) if i % 3 == 0 else ("openai/gpt-4.1-mini", 1 if i % 3 == 1 else 0)
            assert (r["model"], r["fallback_level"]) == want, r
        assert 1 <= sim.counters.by_model["old-model"] <= 10  # out of the chain once it answered 404

    def test_check_models_with_a_lines_own_model(self, tmp_path: Path, sim: SimThread) -> None:
        """A model only a Batch line names is checked against the provider's list like the chain's."""
        data = write_jsonl(tmp_path / "in.jsonl", [batch_line(i) for i in range(5)])
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url,
                        input={**BATCH_INPUT, "body_model": "keep"}, run={"check_models": True})
        proc = run_cli("run", str(job), "-q")
        assert proc.returncode == 0, proc.stderr
        assert "does not list gpt-4o-mini" in proc.stderr
        assert sim.counters.by_model["gpt-4o-mini"] == 5

    def test_lines_for_another_endpoint_block_the_run_with_their_line(self, tmp_path: Path, sim: SimThread) -> None:
        lines = [batch_line(i) for i in range(5)]
        lines[3]["url"] = "/v1/embeddings"
        data = write_jsonl(tmp_path / "in.jsonl", lines)
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, input=BATCH_INPUT)
        proc = run_cli("run", str(job), "--quiet")
        assert proc.returncode == 2
        assert "line 4: url '/v1/embeddings' is not chat completions" in proc.stderr
        assert sim.counters.requests == 0


def test_estimate_uses_each_lines_own_max_tokens(tmp_path: Path) -> None:
    lines = [batch_line(i, max_tokens=50 if i % 2 else 10) for i in range(10)]
    data = write_jsonl(tmp_path / "in.jsonl", lines)
    job = write_job(tmp_path, input_path=data, base_url="http://127.0.0.1:9/v1", input=BATCH_INPUT,
                    request={"temperature": 0})
    proc = run_cli("estimate", str(job), "--json")
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["completion_tokens_max"] == 5 * 50 + 5 * 10


class TestRecognition:
    def test_a_jsonl_file_in_batch_format_is_recognised(self, tmp_path: Path) -> None:
        data = write_jsonl(tmp_path / "in.jsonl", [batch_line(0)])
        job = write_job(tmp_path, input_path=data, base_url="http://127.0.0.1:9/v1", input=BATCH_INPUT)
        assert load_job(job).input.format == "openai-batch"
        assert load_job(job).input.id_column == "custom_id"

    def test_a_batch_file_declared_as_plain_jsonl_gets_a_hint(self, tmp_path: Path) -> None:
        data = write_jsonl(tmp_path / "in.jsonl", [batch_line(0)])
        job = write_job(tmp_path, input_path=data, base_url="http://127.0.0.1:9/v1",
                        input={**BATCH_INPUT, "format": "jsonl"})
        with pytest.raises(JobError, match="looks like an OpenAI Batch file"):
            load_job(job)

    def test_a_template_with_a_batch_file_is_an_error(self, tmp_path: Path) -> None:
        data = write_jsonl(tmp_path / "in.jsonl", [batch_line(0)])
        job = write_job(tmp_path, input_path=data, base_url="http://127.0.0.1:9/v1", input={"id_column": None})
        with pytest.raises(JobError, match=r"input.template: not used with an OpenAI Batch file"):
            load_job(job)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
maybe = st.one_of(st.just(MISSING), json_values)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text()}),
                    max_size=3)
bodies = st.one_of(maybe, st.fixed_dictionaries({"messages": messages},
                                                optional={"model": json_values, "temperature": json_values,
                                                          "stream": st.booleans()}))


@settings(max_examples=300, deadline=None)
@given(method=st.one_of(maybe, st.just("POST")), url=st.one_of(maybe, st.just("/v1/chat/completions")),
       body=bodies, custom_id=st.one_of(st.none(), st.text(max_size=5)))
def test_any_batch_line_becomes_a_request_or_a_named_problem(method: Any, url: Any, body: Any,
                                                             custom_id: Any) -> None:
    builder = PromptBuilder(template=None, messages_column=None, system=None, id_column=None, keep_columns=(),
                            request_fields={"max_tokens": 3}, chain_key="x", batch_file=True,
                            keep_body_model=True)
    batch = RowBatch(0, {"custom_id": [custom_id], "method": [method], "url": [url], "body": [body]}, [1], 1)
    (req,) = builder.build(batch, builder.ids(batch), None)
    if req.problem is not None:
        assert req.problem[1].startswith("line 1")
        return
    sent = orjson.loads(b'{"model":"m",' + req.tail)
    assert sent["messages"] == body["messages"] and "stream" not in sent
    assert sent["max_tokens"] == 3 and req.max_tokens == 3  # the limiter reserves the line's own max_tokens
    assert req.model == body.get("model")
    assert req.cacheable == (body.get("temperature") == 0)


def test_the_fingerprint_records_body_model_only_for_batch_files(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [batch_line(0)])
    job = write_job(tmp_path, input_path=data, base_url="http://127.0.0.1:9/v1", input=BATCH_INPUT)
    assert fingerprint(load_job(job))["body_model"] == "replace"
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"id": 1, "text": "x"}])
    assert "body_model" not in fingerprint(load_job(write_job(tmp_path, input_path=plain, name="plain.toml",
                                                             base_url="http://127.0.0.1:9/v1")))
