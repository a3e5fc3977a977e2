"""preflight.py: validate blocks on exactly what run blocks on, and both say why before anything is sent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.errors import JobError
from batch.job import parse_job
from batch.sim import SimThread
from tests.conftest import TEST_KEY, run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"row {i}"} for i in range(n)]


def both(job: Path, env: dict[str, str] | None = None) -> tuple[Any, Any]:
    """``batch validate`` and then ``batch run`` of the same job."""
    return run_cli("validate", str(job), env=env), run_cli("run", str(job), "--quiet", env=env)


class TestValidateBlocksWhatRunBlocks:
    def test_missing_key(self, tmp_path: Path, sim: SimThread) -> None:
        """A provider key missing from the environment blocks validate (exit 2) as it blocks run, naming the variable."""
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(3)), base_url=sim.base_url,
                        api_key_env="SIM_API_KEY")
        checked, ran = both(job)
        assert checked.returncode == 2 and "blocking: provider 'local': environment variable SIM_API_KEY" \
            in checked.stdout and "ready to run" not in checked.stdout
        assert ran.returncode == 2 and "SIM_API_KEY is not set" in ran.stderr
        assert sim.counters.requests == 0

    def test_output_of_another_job(self, tmp_path: Path, sim: SimThread) -> None:
        """An output made by a job with another template blocks validate as it blocks run."""
        data = write_jsonl(tmp_path / "in.jsonl", rows(3))
        first = write_job(tmp_path, input_path=data, base_url=sim.base_url)
        assert run_cli("run", str(first), "--quiet").returncode == 0
        changed = write_job(tmp_path, input_path=data, base_url=sim.base_url, input={"template": "Echo {text}"})
        checked, ran = both(changed)
        assert checked.returncode == 2 and "holds answers to a different job" in checked.stdout
        assert ran.returncode == 2 and "holds answers to a different job" in ran.stderr
        assert sim.counters.requests == 3

    def test_template_field_in_no_row_jsonl(self, tmp_path: Path, sim: SimThread) -> None:
        """A template field no JSONL line has is a job error, exit 2 before sending, with the keys there are;
        a field only some lines lack stays a row problem."""
        data = write_jsonl(tmp_path / "in.jsonl", rows(40))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, input={"template": "Say {txt}"})
        checked, ran = both(job)
        expected = "input.template field {txt}: no column 'txt' in the input; did you mean 'text'? " \
                   "(keys seen in its 40 rows: id, text)"
        assert checked.returncode == 2 and f"blocking: {expected}" in checked.stdout
        assert "40 rows cannot be sent" not in checked.stdout  # the cause is said once, not per row
        assert ran.returncode == 2 and expected in ran.stderr
        assert sim.counters.requests == 0 and not (tmp_path / "out" / "results").exists()
        write_jsonl(data, rows(5) + [{"id": "x", "txt": "only here"}])
        proc = run_cli("validate", str(job))
        assert proc.returncode == 0 and "5 rows cannot be sent (missing_field 5)" in proc.stdout

    def test_template_field_absent_from_parquet(self, tmp_path: Path, sim: SimThread) -> None:
        """A template field that is no Parquet column names the columns, with a case-insensitive near miss."""
        data = tmp_path / "in.parquet"
        pq.write_table(pa.table({"id": ["a", "b"], "Body": ["x", "y"]}), data)
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, input={"template": "Say {body}"})
        checked, ran = both(job)
        assert checked.returncode == 2 and "2 rows in" in checked.stdout
        assert "no column 'body' in the input; did you mean 'Body'? (its columns: id, Body)" in checked.stdout
        assert ran.returncode == 2 and "did you mean 'Body'?" in ran.stderr and sim.counters.requests == 0

    def test_request_typo(self, tmp_path: Path, sim: SimThread) -> None:
        """A misspelt [request] key is a job error with the parameter it is closest to; nothing is sent."""
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(3)), base_url=sim.base_url,
                        request={"temprature": 0, "max_tokens": 5})
        checked, ran = both(job)
        assert checked.returncode == 2 and "request.temprature: not a chat-completions parameter" in checked.stderr
        assert "did you mean 'temperature'?" in checked.stderr and "[request.extra]" in checked.stderr
        assert ran.returncode == 2 and "request.temprature" in ran.stderr and sim.counters.requests == 0


class TestRequestParameters:
    def test_extra_table_is_sent_as_it_is(self, tmp_path: Path, sim: SimThread) -> None:
        """[request.extra] fields reach the provider unchanged, unknown names included (max_tokens 1 truncates)."""
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(4)), base_url=sim.base_url,
                        request={"temperature": 0},
                        extra={"request.extra": {"max_tokens": 1, "safe_prompt": True}})
        proc = run_cli("run", str(job), "--quiet")
        assert proc.returncode == 0, proc.stderr
        df = pd.read_parquet(tmp_path / "out" / "results")
        assert (df["finish_reason"] == "length").all() and (df["completion_tokens"] == 1).all()

    @pytest.mark.parametrize(("request_", "problem"), [
        ({"extra": {"model": "x"}}, "request.extra.model: set by batch"),
        ({"top_p": 1, "extra": {"top_p": 1}}, "request.extra.top_p: also set in [request]"),
        ({"extra": 3}, "request.extra: expected a table"),
        ({"max_token": 5}, "did you mean 'max_tokens'?"),
    ])
    def test_refused(self, request_: dict[str, Any], problem: str) -> None:
        """Reserved keys, a key set twice and a misspelt key are job errors that name the key."""
        data = {"input": {"path": "in.jsonl", "template": "{text}"}, "output": {"path": "out"},
                "models": [{"model": "m"}], "request": request_}
        with pytest.raises(JobError, match=problem.replace("[", r"\[").replace("?", r"\?")):
            parse_job(data, Path("/jobs/job.toml"))

    def test_openrouter_parameter_on_openai_warns(self, tmp_path: Path) -> None:
        """top_k on a job that sends to OpenAI is a warning, not an error; in [request.extra] it is neither."""
        data = write_jsonl(tmp_path / "in.jsonl", rows(2))
        models = [{"provider": "openai", "model": "gpt-4o-mini"}]
        env = {"OPENAI_API_KEY": TEST_KEY}
        job = write_job(tmp_path, input_path=data, models=models, request={"temperature": 0, "top_k": 3})
        proc = run_cli("validate", str(job), env=env)
        assert proc.returncode == 0 and "ready to run" in proc.stdout
        assert "warning: request.top_k: an OpenRouter parameter" in proc.stdout and "openai:gpt-4o-mini" in proc.stdout
        quiet = write_job(tmp_path, input_path=data, models=models, request={"temperature": 0},
                          extra={"request.extra": {"top_k": 3}})
        assert "warning" not in run_cli("validate", str(quiet), env=env).stdout


class TestSimTable:
    def test_sim_table_without_a_sim_model_warns(self, tmp_path: Path, sim: SimThread) -> None:
        """A [sim] table in a job that sends to no embedded simulator is said to be ignored, by validate and run;
        with provider "sim" nothing is said."""
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(2)), base_url=sim.base_url,
                        sim={"latency_ms": 5})
        checked, ran = both(job)
        assert checked.returncode == 0 and "warning: [sim] is ignored" in checked.stdout
        assert ran.returncode == 0 and "warning: [sim] is ignored" in ran.stderr
        used = write_job(tmp_path, input_path=tmp_path / "in.jsonl", name="used.toml",
                         models=[{"provider": "sim", "model": "openai/gpt-4.1-mini"}], sim={"latency_ms": 5})
        assert "warning" not in run_cli("validate", str(used)).stdout  # provider "sim" uses the table


class TestModelsThatWillNotAnswer:
    def test_retired_primary_is_named_with_its_successor(self, tmp_path: Path) -> None:
        """validate names a catalog-retired model, its successor and where its rows go instead; nothing is sent."""
        models = [{"provider": "sim", "model": "openai/gpt-3.5-turbo"}, {"provider": "sim", "model": "openai/gpt-4.1-mini"}]
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(2)), models=models)
        proc = run_cli("validate", str(job))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "models[0] sim:openai/gpt-3.5-turbo: retired by its provider" in proc.stdout
        assert "its rows go to sim:openai/gpt-4.1-mini" in proc.stdout

    def test_model_missing_from_the_listing(self, tmp_path: Path) -> None:
        """With run.check_models, a model the provider does not list is named, and so is a chain with nothing after."""
        models = [{"provider": "sim", "model": "openai/gpt-4o-mini"}]
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(2)), models=models,
                        run={"check_models": True}, sim={"models": ["openai/gpt-4.1-mini"]})
        proc = run_cli("validate", str(job))
        assert "models[0] sim:openai/gpt-4o-mini: not in sim's model list" in proc.stdout, proc.stdout + proc.stderr
        assert "every row would end as an error row" in proc.stdout
