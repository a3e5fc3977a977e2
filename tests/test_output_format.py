"""[output_format]: labels, JSON schema and regex answers are checked, repaired, and parsed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.dataset as ds
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch.answers import make_checker, resolve_response_format, schema_problems, validate
from batch.catalog import facts_for
from batch.errors import JobError
from batch.job import load_job
from batch.sim import SimThread
from batch.sim_answers import instance_of
from tests.conftest import ROOT, run_cli, write_job, write_jsonl

LABELS = ["positive", "negative", "neutral"]
SCHEMA = {"type": "object", "required": ["product", "sentiment", "stars"], "additionalProperties": False,
          "properties": {"product": {"type": "string"},
                         "sentiment": {"type": "string", "enum": LABELS},
                         "stars": {"type": "integer", "minimum": 1, "maximum": 5}}}


def reviews(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"review {i}: it was {['great', 'bad', 'fine'][i % 3]}"} for i in range(n)]


def results(out: Path) -> pd.DataFrame:
    return ds.dataset(out / "results").to_table().to_pandas()


class TestLabels:
    def test_invalid_labels_are_repaired_or_end_as_invalid_output(self, tmp_path: Path, sim_factory: Any) -> None:
        sim = sim_factory(invalid_answers=0.2, seed=3)
        data = write_jsonl(tmp_path / "in.jsonl", reviews(600))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url,
                        input={"template": "Label the sentiment (positive/negative/neutral): {text}"},
                        extra={"output_format": {"labels": LABELS, "max_repairs": 2}})
        proc = run_cli("run", str(job), "-q")
        assert proc.returncode in (0, 1), proc.stderr
        df = results(tmp_path / "out")
        assert len(df) == 600 and df["id"].is_unique
        ok, bad = df[df["status"] == "ok"], df[df["status"] == "error"]
        assert ok["parsed"].isin(LABELS).all() and (ok["parsed"] == ok["output"]).all()
        assert (bad["error_type"] == "invalid_output").all()
        assert (bad["attempts"] == 3).all()  # the first answer and two repairs
        assert not bad["output"].isin(LABELS).any() and bad["output"].notna().all()  # the raw answer is kept
        stats = pd.read_parquet(tmp_path / "out" / "stats.parquet")
        assert stats["invalid_outputs"].sum() == sim.counters.invalid_answers > 60  # about 20% of requests
        assert stats["repairs"].sum() == sim.counters.invalid_answers - len(bad)
        assert stats["requests"].sum() == sim.counters.requests == 600 + stats["repairs"].sum()
        assert df["cost_usd"].sum() == pytest.approx(stats["cost_usd"].sum(), abs=1e-9)  # repairs are billed
        shown = run_cli("stats", str(tmp_path / "out")).stdout
        assert f"answers that failed [output_format]: {sim.counters.invalid_answers}, repairs asked: " \
               f"{stats['repairs'].sum()}" in shown

    def test_after_its_repairs_a_row_falls_back_to_the_next_model(self, tmp_path: Path, sim_factory: Any) -> None:
        sim = sim_factory(invalid_answers=0.3, seed=5)
        data = write_jsonl(tmp_path / "in.jsonl", reviews(300))
        models = [{"provider": "local", "model": "model-a"}, {"provider": "local", "model": "model-b"}]
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, models=models,
                        input={"template": "Label (positive/negative/neutral): {text}"},
                        extra={"output_format": {"labels": LABELS, "max_repairs": 0}})
        run_cli("run", str(job), "-q")
        df = results(tmp_path / "out")
        second = df[df["fallback_level"] == 1]
        assert (second["status"] == "ok").sum() > 30  # about 30% of rows, less those invalid twice
        assert (second["model"] == "model-b").all()
        assert set(df.loc[df["status"] == "error", "error_type"]) <= {"invalid_output"}
        assert (df.loc[df["status"] == "ok", "parsed"]).isin(LABELS).all()

    def test_the_normaliser_decides_what_matches(self) -> None:
        strict = make_checker("labels", labels=LABELS)
        loose = make_checker("labels", labels=LABELS, normalize=["strip", "casefold", "strip_punctuation"])
        assert strict.check("  Positive\n") == ("positive", None)
        assert strict.check("Positive.")[1] is not None
        assert loose.check('"Positive."') == ("positive", None)
        assert loose.check("very positive")[1] is not None


class TestJsonSchema:
    def test_extraction_from_the_demo_reviews_gives_queryable_columns(self, tmp_path: Path) -> None:
        out = tmp_path / "extract"
        proc = run_cli("run", "jobs/extract-fields.toml", "--output", str(out), "-q")
        assert proc.returncode in (0, 1), proc.stderr
        table = ds.dataset(out / "results").to_table()
        assert str(table.schema.field("parsed").type) == \
            "struct<product: string, sentiment: string, would_recommend: bool>"
        flat = table.flatten().to_pandas()  # pandas: one column per field
        ok = flat[flat["status"] == "ok"]
        assert len(ok) >= 290
        assert ok["parsed.sentiment"].isin(LABELS).all()
        assert ok["parsed.would_recommend"].map(type).eq(bool).all()
        assert ok.groupby("parsed.sentiment").size().sum() == len(ok)

    def test_without_response_format_the_repair_message_carries_the_schema(self, tmp_path: Path,
                                                                           sim: SimThread) -> None:
        """No response_format and no instruction: the sim answers prose, the repair shows the schema."""
        data = write_jsonl(tmp_path / "in.jsonl", reviews(100))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, request={"temperature": 0, "max_tokens": 80},
                        extra={"output_format": {"json_schema": SCHEMA, "response_format": "none",
                                                 "instruct": False}})
        assert run_cli("run", str(job), "-q").returncode == 0
        df = results(tmp_path / "out")
        assert (df["attempts"] == 2).all()  # every first answer was prose, every repair valid JSON
        for value in df["parsed"]:
            assert validate(value, SCHEMA) is None

    def test_the_schema_instruction_joins_a_rows_own_system_message(self, tmp_path: Path, sim: SimThread) -> None:
        """Rows that bring their own system message (messages_column, Batch lines) still learn the
        schema: the sim, told nothing else (response_format none), answers valid JSON at once."""
        rows = [{"id": f"m{i}", "messages": [{"role": "system", "content": "Be terse."},
                                             {"role": "user", "content": f"Review {i}: fine."}]} for i in range(20)]
        data = write_jsonl(tmp_path / "in.jsonl", rows)
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url,
                        input={"template": None, "messages_column": "messages"},
                        request={"temperature": 0, "max_tokens": 80},
                        extra={"output_format": {"json_schema": SCHEMA, "response_format": "none"}})
        assert run_cli("run", str(job), "-q").returncode == 0
        assert (results(tmp_path / "out")["attempts"] == 1).all()

    def test_a_schema_with_an_unsupported_keyword_is_refused_at_load(self, tmp_path: Path) -> None:
        data = write_jsonl(tmp_path / "in.jsonl", reviews(1))
        schema = {"type": "object", "oneOf": [{"required": ["a"]}]}
        job = write_job(tmp_path, input_path=data, base_url="http://127.0.0.1:9/v1",
                        extra={"output_format": {"json_schema": schema}})
        with pytest.raises(JobError, match=r"output_format.json_schema.oneOf: unsupported JSON Schema keyword"):
            load_job(job)

    def test_fenced_json_is_accepted_and_broken_json_is_named(self) -> None:
        checker = make_checker("json_schema", schema=SCHEMA)
        fenced = '```json\n{"product": "lamp", "sentiment": "neutral", "stars": 3}\n```'
        assert checker.check(fenced) == ({"product": "lamp", "sentiment": "neutral", "stars": 3}, None)
        assert "not valid JSON" in (checker.check('{"product": "lamp"')[1] or "")
        assert checker.check('{"product": "lamp", "sentiment": "meh", "stars": 3}')[1] == \
            '$.sentiment must be one of ["positive","negative","neutral"], got \'meh\''
        assert "$.stars breaks maximum 5" in (checker.check('{"product": "x", "sentiment": "neutral", "stars": 9}')[1]
                                              or "")

    def test_forcing_structured_outputs_on_gpt35_is_refused_and_auto_is_not(self, tmp_path: Path,
                                                                            sim_factory: Any) -> None:
        """A provider still serving gpt-3.5-turbo (JSON mode only): forcing json_schema is refused, auto sends
        JSON mode from the catalog's facts."""
        sim = sim_factory(catalog_retired=False)
        data = write_jsonl(tmp_path / "in.jsonl", reviews(20))
        for mode, want in (("json_schema", {"bad_request"}), ("auto", set())):
            job = write_job(tmp_path, input_path=data, base_url=sim.base_url, name=f"{mode}.toml",
                            models=[{"provider": "local", "model": "openai/gpt-3.5-turbo"}],
                            output={"path": str(tmp_path / mode)}, request={"temperature": 0, "max_tokens": 80},
                            extra={"output_format": {"json_schema": SCHEMA, "response_format": mode}})
            run_cli("run", str(job), "-q")
            df = results(tmp_path / mode)
            assert set(df["error_type"].dropna()) == want, mode
        refused = results(tmp_path / "json_schema")
        assert refused["error_message"].str.contains("'json_schema' is not supported with this model").all()

    def test_check_models_learns_which_models_lack_structured_outputs(self, tmp_path: Path,
                                                                     sim_factory: Any) -> None:
        """A model unknown to the catalog gets structured outputs, which it refuses; with
        run.check_models its supported_parameters say to use JSON mode instead."""
        sim = sim_factory(json_mode_only=("vendor/json-mode",), models=("vendor/json-mode",))
        data = write_jsonl(tmp_path / "in.jsonl", reviews(20))
        for check, want in ((False, {"bad_request"}), (True, set())):
            name = f"check-{check}"
            job = write_job(tmp_path, input_path=data, base_url=sim.base_url, name=f"{name}.toml",
                            models=[{"provider": "local", "model": "vendor/json-mode"}],
                            output={"path": str(tmp_path / name)}, run={"check_models": check},
                            request={"temperature": 0, "max_tokens": 80},
                            extra={"output_format": {"json_schema": SCHEMA}})
            run_cli("run", str(job), "-q")
            assert set(results(tmp_path / name)["error_type"].dropna()) == want, check

    def test_gpt35_gets_json_mode_and_unknown_models_structured_outputs(self) -> None:
        facts = facts_for("openai/gpt-3.5-turbo")
        assert facts is not None
        assert resolve_response_format("auto", "json_schema", facts.response_formats) == "json_object"
        assert resolve_response_format("auto", "json_schema", None) == "json_schema"
        assert resolve_response_format("auto", "labels", None) == "none"


def test_a_regex_captures_its_group(tmp_path: Path, sim: SimThread) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", reviews(40))
    job = write_job(tmp_path, input_path=data, base_url=sim.base_url,
                    input={"template": "Would you buy it again (yes/no)? {text}"},
                    extra={"output_format": {"regex": r"^(yes|no)$"}})
    assert run_cli("run", str(job), "-q").returncode == 0
    df = results(tmp_path / "out")
    assert set(df["parsed"]) <= {"yes", "no"} and (df["parsed"] == df["output"]).all()


def test_shipped_labeling_job_ends_with_valid_labels(tmp_path: Path) -> None:
    proc = run_cli("run", str(ROOT / "jobs" / "label-sentiment.toml"), "--output", str(tmp_path / "o"), "-q")
    assert proc.returncode in (0, 1), proc.stderr
    df = results(tmp_path / "o")
    assert len(df) == 300
    assert df.loc[df["status"] == "ok", "parsed"].isin(LABELS).all()
    assert set(df.loc[df["status"] == "error", "error_type"]) <= {"invalid_output"}


schemas = st.recursive(
    st.sampled_from([{"type": "string"}, {"type": "integer", "minimum": -5, "maximum": 5}, {"type": "boolean"},
                     {"type": "number"}, {"type": "null"}, {"enum": ["a", "b", 3]}, {"type": "string", "maxLength": 4}]),
    lambda inner: st.one_of(
        st.builds(lambda items: {"type": "array", "items": items, "minItems": 1, "maxItems": 3}, inner),
        st.dictionaries(st.text("abcxyz", min_size=1, max_size=4), inner, min_size=1, max_size=4).map(
            lambda props: {"type": "object", "properties": props, "required": sorted(props),
                           "additionalProperties": False})),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(schema=schemas, prompt=st.text(max_size=30))
def test_the_validator_accepts_what_the_simulator_generates(schema: dict[str, Any], prompt: str) -> None:
    """Two independent readings of a schema agree: the sim's instance validates, and round-trips
    through the checker into the Arrow shape of the parsed column."""
    import orjson
    import pyarrow as pa

    assert schema_problems(schema) == []
    value = instance_of(schema, prompt, "$")
    assert validate(value, schema) is None
    checker = make_checker("json_schema", schema=schema)
    parsed, problem = checker.check(orjson.dumps(value).decode())
    assert problem is None
    pa.array([parsed], type=checker.parsed_type)  # fits the column type


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),  # what TOML and JSON can hold
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["type", "properties", "items", "required", "enum", "pattern", "minimum", "maxLength",
                         "additionalProperties", "const", "x"]), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(schema=json_values, answer=json_values)
def test_any_schema_is_refused_with_reasons_or_validates_any_answer_without_raising(schema: Any,
                                                                                     answer: Any) -> None:
    """The schema reader never crashes on what a job file may hold; a schema it accepts can check
    any JSON answer (a verdict, never an exception)."""
    import orjson

    problems = schema_problems(schema)
    if problems:
        assert all(p.startswith("json_schema") for p in problems)
        return
    checker = make_checker("json_schema", schema=schema)
    parsed, problem = checker.check(orjson.dumps(answer).decode())
    assert (problem is None) == (validate(answer, schema) is None)
