"""The repair loop of one row at one model ([output_format]).

An answer that fails the job's check is shown back to the model with what was
wrong ("That answer is invalid: WHY. Reply again with WHAT, and nothing
else."), up to ``max_repairs`` times per model; then the row falls back.
"""

from __future__ import annotations

from typing import Any

import orjson

from batch.answers import Checker
from batch.prompts import Request
from batch.tokens import TOKENS_REPLY_PRIMER, heuristic_tokens

CUT_NOTE = " (the answer was cut at max_tokens: a larger [request] max_tokens may fix this)"


class Repairs:
    """Judges a row's answers at one model and builds the next request of its conversation."""

    __slots__ = ("checker", "max_repairs", "req", "count", "extra_tokens", "_conversation")

    def __init__(self, checker: Checker, max_repairs: int, req: Request) -> None:
        self.checker = checker
        self.max_repairs = max_repairs
        self.req = req
        self.count = 0  # repairs asked so far at this model
        self.extra_tokens = 0  # estimated prompt tokens the repair messages add to the row's prompt
        self._conversation: dict[str, Any] | None = None  # the request as a dict, once a repair needs it

    def judge(self, text: str, finish_reason: str) -> tuple[Any, str | None]:
        """(parsed value, None) for a valid answer, else (None-ish, the reason it is invalid)."""
        parsed, problem = self.checker.check(text)
        if problem is not None and finish_reason == "length":
            problem += CUT_NOTE
        return parsed, problem

    @property
    def exhausted(self) -> bool:
        return self.count >= self.max_repairs

    def next_body(self, prefix: bytes, answer: str, problem: str) -> bytes:
        """The body that shows the model its invalid ``answer`` and asks again."""
        self.count += 1
        if self._conversation is None:
            self._conversation = orjson.loads(b"{" + self.req.tail)
        conversation = self._conversation
        added = self.checker.repair_messages(answer, problem)
        self.extra_tokens += heuristic_tokens(added) - TOKENS_REPLY_PRIMER  # the primer is in the prompt already
        conversation["messages"] = [*conversation["messages"], *added]
        return prefix + orjson.dumps(conversation)[1:]
