"""``Result``: one output row, built in one place from a request and how it ended.

Field names are the output columns (batch/sinks.py turns a part's Results
into Arrow columns by these names).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from batch.prompts import Request
from batch.provider import Reply


class Result(NamedTuple):
    """One output row.

    A NamedTuple rather than a frozen dataclass: it is built once per row on
    the hot path (about 4x cheaper to construct) and the sink transposes a
    part's rows into columns with one ``zip(*rows)``.
    """

    id: str
    status: str  # "ok" | "error"
    output: str | None
    parsed: Any  # the checked answer ([output_format]): a label, a dict for a struct, a regex capture
    finish_reason: str | None
    model: str | None
    provider: str | None
    fallback_level: int | None
    attempts: int
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None
    cost_usd: float | None  # everything billed for this id: its answer, repairs, billed failures, earlier runs
    cost_source: str | None  # "provider" | "price_table" | "cache" | None
    latency_ms: float | None
    error_type: str | None
    error_message: str | None
    request_hash: str
    cached: bool  # answered from the response cache: no request, no cost
    billed_prompt_tokens: int | None  # tokens of every billed reply for this id (cost_usd is their price)
    billed_completion_tokens: int | None
    lane: str  # "online" (a request, or the response cache) or "batch" (a provider Batch API)
    batch_id: str | None  # the provider's batch that answered it (lane "batch")
    response_body: bytes | None  # the reply's JSON body (output.raw_response), else None
    keep: tuple[Any, ...]


def result_row(req: Request, *, attempts: int, reply: Reply | None = None, error: tuple[str, str] | None = None,
               provider: str | None = None, level: int | None = None, model: str | None = None,
               parsed: Any = None, output: str | None = None, cost: float | None = None,
               cost_source: str | None = None, cached: bool = False, keep_body: bool = False,
               billed: tuple[int, int] = (0, 0), lane: str = "online", batch_id: str | None = None) -> Result:
    """The row for ``req``: an answer (``reply``) or an error (``error`` = (error_type, message)).

    An error row may still carry ``output`` (the last invalid answer) and the
    ``cost`` and ``billed`` (prompt, completion) tokens of its billed attempts.
    """
    if reply is not None:
        return Result(req.id, "ok", reply.text, parsed, reply.finish_reason, reply.model, provider, level, attempts,
                      reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens, reply.reasoning_tokens,
                      cost, cost_source, None if cached else round(reply.latency_ms, 3), None, None,
                      req.request_hash, cached, billed[0], billed[1], lane, batch_id, reply.raw if keep_body else None,
                      req.keep)
    kind, message = error if error is not None else ("internal", "no reply and no error")
    return Result(req.id, "error", output, None, None, model, provider, level, attempts, None, None, None, None,
                  cost, cost_source, None, kind, message, req.request_hash, False, billed[0], billed[1], lane,
                  batch_id, None, req.keep)


def error_result(req: Request, kind: str, message: str, *, attempts: int, level: int | None = None,
                 model: str | None = None, charged: float = 0.0, output: str | None = None,
                 billed: tuple[int, int] = (0, 0)) -> Result:
    """An ``error`` row; ``charged`` and ``billed`` are what failed attempts of the row were billed."""
    return result_row(req, attempts=attempts, error=(kind, message), level=level, model=model or None,
                      output=output, cost=charged or None, cost_source="provider" if charged else None,
                      billed=billed)
