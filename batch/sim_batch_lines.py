"""What one line of a simulated batch answers: the chat endpoint's answer, or an error.

A line answers what the chat endpoint gives the first request for the same
prompt (``structured_answer`` or ``answer_for``, ``truncate`` to the line's
``max_tokens``, ``usage_for``), billed at ``batch_price_factor`` of the chat
price; or it fails: an injected failure (``batch_line_failures``, drawn per
(seed, custom_id), so a line fails the same way in every batch), or one of the
chat endpoint's 400s (prompt over the context window, unsupported
``response_format``). Used by batch/sim_batch.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batch.sim_answers import answer_for, invalid_version, prompt_key, structured_answer, truncate, usage_for
from batch.sim_config import SimConfig
from batch.sim_faults import fault_draw, request_refusal


def draw(seed: int, *parts: object) -> float:
    """A uniform number in [0, 1) from a hash of the seed and ``parts``: the same inputs draw the same."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


def token(seed: int, *parts: object, length: int = 24) -> str:
    """A deterministic hex string for ids (the simulator's ids are opaque, as the real ones)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()[:length]


@dataclass(frozen=True, slots=True)
class Line:
    """One request of a batch: the client's ``custom_id`` and the chat-completions body."""

    custom_id: str
    body: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished line gets: an answer, or an error (``code`` set) with the HTTP status it stands for."""

    text: str = ""
    finish_reason: str = "stop"
    usage: Mapping[str, Any] = field(default_factory=dict)  # tokens, and cost at the batch price
    status: int = 200
    code: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code is None


def base_model(model: str) -> str:
    """The chat model behind a batch slug: the simulator takes ``x`` and ``x:batch`` alike (open question 2)."""
    return model.removesuffix(":batch")


def messages_of(line: Line) -> list[dict[str, Any]]:
    """The line's messages, or [] when they are not a list of objects (the line then fails with a 400)."""
    messages = line.body.get("messages")
    ok = isinstance(messages, list) and all(isinstance(m, dict) for m in messages)
    return list(messages) if ok and isinstance(messages, list) else []


def model_problem(cfg: SimConfig, model: str) -> str | None:
    """Why a batch for ``model`` fails validation (the chat endpoint's retired/models knobs), or None."""
    base = base_model(model)
    if cfg.is_retired(base):
        return f"Model {model} has been retired and has no batch endpoint."
    if cfg.models and base not in cfg.models:
        return f"Model {model} does not exist or has no batch endpoint."
    return None


def outcome_for(cfg: SimConfig, model: str, line: Line) -> Outcome:
    """A line's deterministic outcome: an injected failure (batch_line_failures, per (seed, custom_id)),
    the chat endpoint's 400s for a too-long prompt or an unsupported response_format, else its answer."""
    body, base = line.body, base_model(model)
    messages = messages_of(line)
    if not messages:
        return Outcome(status=400, code="invalid_request_error", message="'messages' must be a non-empty array "
                       "of message objects.")
    if draw(cfg.seed, "line-fails", line.custom_id) < cfg.batch_line_failures:
        if draw(cfg.seed, "line-status", line.custom_id) < 0.5:
            return Outcome(status=500, code="server_error", message="The server had an error processing the request.")
        return Outcome(status=400, code="invalid_request_error", message="The request was rejected upstream.")
    refusal = _chat_refusal(cfg, base, messages, body)
    if refusal is not None:
        return refusal
    answer = structured_answer(messages, body) or answer_for(messages)
    if cfg.invalid_answers and fault_draw(cfg.seed + 1, prompt_key(messages), 0) < cfg.invalid_answers:
        answer = invalid_version(answer)  # as the chat endpoint's first request for this prompt
    text, finish = truncate(answer, body.get("max_tokens"))
    usage = usage_for(messages, text, base)
    usage["cost"] = round(usage["cost"] * cfg.batch_price_factor, 12)
    return Outcome(text=text, finish_reason=finish, usage=usage)


def _chat_refusal(cfg: SimConfig, model: str, messages: list[dict[str, Any]],
                  body: Mapping[str, Any]) -> Outcome | None:
    """The 400s the chat endpoint gives, as a line error."""
    refused = request_refusal(model, cfg.response_formats(model), cfg.context_window(model), messages, body)
    return None if refused is None else Outcome(status=400, code=refused[0], message=refused[1])


def prompt_tokens(line: Line, model: str) -> int:
    messages = messages_of(line)
    return int(usage_for(messages, "", base_model(model))["prompt_tokens"]) if messages else 0
