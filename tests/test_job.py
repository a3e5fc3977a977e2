"""job.py: the TOML contract, validated once, with errors that say where and what."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch.errors import JobError
from batch.job import load_job, parse_job

BASE: dict[str, Any] = {
    "input": {"path": "in.jsonl", "template": "Say {text}"},
    "output": {"path": "out"},
    "models": [{"provider": "openrouter", "model": "openai/gpt-4.1-mini"}],
}


def parse(data: dict[str, Any]) -> Any:
    return parse_job(data, Path("/jobs/job.toml"))


def with_(section: str, **values: Any) -> dict[str, Any]:
    data = {k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in BASE.items()}
    if section == "models":
        data["models"] = [{**BASE["models"][0], **values}]
    else:
        data[section] = {**data.get(section, {}), **values}
    return data


class TestValidJobs:
    def test_minimal_job_gets_defaults(self) -> None:
        """A minimal job fills in the documented defaults and resolves paths against the job file."""
        job = parse(BASE)
        assert job.input.path == Path("/jobs/in.jsonl")
        assert job.input.format == "jsonl"
        assert job.output.path == Path("/jobs/out")
        assert job.run.concurrency == 64 and job.run.max_attempts == 5
        assert job.providers["openrouter"].base_url == "https://openrouter.ai/api/v1"
        assert job.providers["openrouter"].api_key_env == "OPENROUTER_API_KEY"

    def test_provider_table_overrides_builtin(self) -> None:
        """A [providers.openrouter] table only overrides what it names."""
        data = {**BASE, "providers": {"openrouter": {"headers": {"HTTP-Referer": "https://x.example"}}}}
        job = parse(data)
        assert job.providers["openrouter"].base_url == "https://openrouter.ai/api/v1"
        assert job.providers["openrouter"].headers == {"HTTP-Referer": "https://x.example"}

    def test_shipped_jobs_are_valid(self) -> None:
        """Every job in jobs/ loads."""
        for path in Path("jobs").glob("*.toml"):
            load_job(path)


class TestProblems:
    @pytest.mark.parametrize(("data", "expected"), [
        (with_("run", concurency=3), "run.concurency: unknown key; did you mean 'concurrency'?"),
        (with_("models", tokens_per_minute="2e5"), "models[0].tokens_per_minute: expected a positive integer, got '2e5'"),
        (with_("run", concurrency=0), "run.concurrency: expected a positive integer, got 0"),
        (with_("run", fallback="yes"), "run.fallback: expected true or false"),
        (with_("models", provider="opnrouter"), "did you mean 'openrouter'?"),
        (with_("request", model="x"), "request.model: set by batch"),
        (with_("input", messages_column="m"), "set exactly one of 'template'"),
        (with_("input", template="Say {}"), None),
        ({**BASE, "inptu": {}}, "inptu: unknown key; did you mean 'input'?"),
        ({k: v for k, v in BASE.items() if k != "models"}, "models: required"),
        (with_("input", path="in.csv"), "cannot tell the format"),
    ])
    def test_message_names_key_and_expectation(self, data: dict[str, Any], expected: str | None) -> None:
        """Each mistake is reported with its dotted key and what was expected."""
        if expected is None:
            parse(data)  # template fields are checked when the template is compiled
            return
        with pytest.raises(JobError) as info:
            parse(data)
        assert expected in str(info.value)
        assert "/jobs/job.toml" in str(info.value)

    def test_all_problems_reported_at_once(self) -> None:
        """Several mistakes come back in one error, so they are fixed in one go."""
        data = with_("run", concurency=3, max_attempts=-1)
        with pytest.raises(JobError) as info:
            parse(data)
        assert "concurency" in str(info.value) and "max_attempts" in str(info.value)

    def test_toml_syntax_error_names_the_line(self, tmp_path: Path) -> None:
        """A TOML syntax error carries the line number from the parser."""
        path = tmp_path / "bad.toml"
        path.write_text('[input]\npath = "x.jsonl"\ntemplate = "unterminated\n')
        with pytest.raises(JobError, match=r"line 3"):
            load_job(path)

    def test_missing_file(self, tmp_path: Path) -> None:
        """A job file that does not exist is named."""
        with pytest.raises(JobError, match="not found"):
            load_job(tmp_path / "nope.toml")


toml_scalars = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=False), st.text(max_size=8), st.booleans())


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["input", "output", "models", "run", "request", "providers", "sim", "x"]),
                       st.one_of(toml_scalars, st.dictionaries(st.text(max_size=12), toml_scalars, max_size=4),
                                 st.lists(st.dictionaries(st.text(max_size=12), toml_scalars, max_size=4), max_size=2)),
                       max_size=6))
def test_any_document_is_a_job_or_a_job_error(data: dict[str, Any]) -> None:
    """No TOML document makes validation crash with anything but JobError."""
    try:
        parse(data)
    except JobError:
        pass
