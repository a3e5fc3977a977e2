"""prompts.py: rows become requests; bodies are encoded once; bad rows are flagged, not sent."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batch.errors import JobError
from batch.prompts import PromptBuilder, Template
from batch.tokens import heuristic_tokens
from batch.sources import MISSING, RowBatch


def builder(**kw: Any) -> PromptBuilder:
    args: dict[str, Any] = dict(template="Label {text} for {who}", messages_column=None, system=None,
                                id_column="id", keep_columns=(), request_fields={"temperature": 0}, chain_key="m")
    args.update(kw)
    return PromptBuilder(**args)


def batch_of(**columns: list[Any]) -> RowBatch:
    n = len(next(iter(columns.values())))
    return RowBatch(0, dict(columns), list(range(1, n + 1)), n)


class TestTemplate:
    def test_fields_become_positional(self) -> None:
        """Named fields compile to positions; literal braces survive."""
        t = Template.compile("{{raw}} {a} and {b} and {a!r:>5}")
        assert t.fields == ("a", "b")
        assert t.positional.format("x", "y") == "{raw} x and y and   'x'"

    @pytest.mark.parametrize("bad", ["{", "x }", "{}"])
    def test_malformed_template_is_a_job_error(self, bad: str) -> None:
        """A malformed template fails before anything is read."""
        with pytest.raises(JobError, match="input.template"):
            Template.compile(bad)


class TestBuild:
    def test_body_is_the_chat_request_with_the_model_spliced_in(self) -> None:
        """body_for() yields exactly the JSON a client would send."""
        b = builder(system="Be brief.")
        batch = batch_of(id=[7], text=["cats"], who=["me"])
        (req,) = list(b.build(batch, b.ids(batch), None))
        body = orjson.loads(req.body_for(b'{"model":"openai/gpt-4.1-mini",'))
        assert body == {"model": "openai/gpt-4.1-mini", "temperature": 0, "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Label cats for me"}]}
        assert req.id == "7" and req.prompt_tokens > 0 and len(req.request_hash) == 32

    def test_missing_and_null_fields_become_problems(self) -> None:
        """A row with a missing or null template field is flagged with its line, not sent."""
        b = builder()
        batch = batch_of(id=["a", "b", None], text=["x", None, "z"], who=[MISSING, "y", "w"])
        reqs = list(b.build(batch, b.ids(batch), None))
        assert [r.problem[0] if r.problem else None for r in reqs] == ["missing_field", "null_field", "missing_id"]
        assert "line 1" in reqs[0].problem[1]  # type: ignore[index]

    def test_messages_column(self) -> None:
        """A messages column is sent as given, as a list or as a JSON string, with the system prompt first."""
        b = builder(template=None, messages_column="m", system="S")
        msgs = [{"role": "user", "content": "hi"}]
        batch = batch_of(id=[1, 2, 3], m=[msgs, orjson.dumps(msgs).decode(), [{"content": "no role"}]])
        reqs = list(b.build(batch, b.ids(batch), None))
        for r in reqs[:2]:
            assert orjson.loads(r.body_for(b'{"model":"x",'))["messages"][0] == {"role": "system", "content": "S"}
        assert reqs[2].problem is not None and reqs[2].problem[0] == "bad_messages"

    def test_skip_mask_drops_rows(self) -> None:
        """Rows marked in the skip mask produce no request."""
        b = builder()
        batch = batch_of(id=[1, 2, 3], text=["a", "b", "c"], who=["x", "y", "z"])
        assert [r.id for r in b.build(batch, b.ids(batch), [False, True, False])] == ["1", "3"]


def test_token_heuristic_counts_chars_and_framing() -> None:
    """~4 characters per token plus 4 per message and 3 for the reply primer."""
    assert heuristic_tokens([{"role": "user", "content": "x" * 400}]) == 100 + 4 + 3
