"""What the simulator's Batch APIs put on the wire: JSON in, JSON out, no HTTP.

For OpenRouter (WIRE-BATCH A): the submission checks that answer 400 at once,
the batch object, the per-line result envelope and its paging cursors. For
OpenAI (WIRE-BATCH B): the create checks, the input-file checks whose failures
only show once validation ends (``errors.data``), the batch and file objects,
and the output and error files. batch/sim_batch_http.py serves them.

Error codes in ``errors.data`` other than ``token_limit_exceeded`` are the
simulator's names (the sources quote no others); a client should read the
message, not rely on the code.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

from batch.sim_config import SimConfig
from batch.sim_batch import EXPIRED_MESSAGE, TERMINAL, BatchBook, LineResult, SimBatch, SimFile
from batch.sim_batch_lines import Line, draw, token

CHAT = "/v1/chat/completions"
OPENROUTER_ENDPOINTS = (CHAT, "/v1/responses", "/v1/messages", "/v1/embeddings")
OPENAI_ENDPOINTS = (CHAT, "/v1/responses", "/v1/embeddings", "/v1/completions", "/v1/moderations",
                    "/v1/images/generations", "/v1/images/edits", "/v1/videos")
OPENROUTER_MAX_REQUESTS = 5_000
OPENAI_MAX_REQUESTS = 50_000
MAX_FILE_ERRORS = 100  # errors.data lists the first problems, not one per line of a broken file
THIRTY_DAYS = 30 * 86_400
STATUS_TIMES = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")


def completion(batch: SimBatch, r: LineResult, gen_id: str, *, openrouter: bool) -> dict[str, Any]:
    """The chat.completion a finished line answered: OpenRouter's (provider, usage.cost, open question 6)
    or OpenAI's (no cost)."""
    o = r.outcome
    usage = dict(o.usage)
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": o.text},
                              "finish_reason": o.finish_reason, "logprobs": None}
    body: dict[str, Any] = {"id": gen_id, "object": "chat.completion", "created": int(batch.created_wall),
                            "model": batch.model, "choices": [choice], "usage": usage}
    if openrouter:
        body["provider"] = "Sim"
        choice["native_finish_reason"] = o.finish_reason
    else:
        del usage["cost"]
        body["system_fingerprint"] = None
    return body


def _answered(results: Iterable[LineResult]) -> tuple[int, int, float]:
    ok = [r.outcome.usage for r in results if r.kind == "ok"]
    return (sum(u["prompt_tokens"] for u in ok), sum(u["completion_tokens"] for u in ok),
            round(sum(u["cost"] for u in ok), 12))


# --- OpenRouter -------------------------------------------------------------------------------


def submission_problem(body: Any) -> str | None:
    """Why OpenRouter refuses a submission with 400 at once, or None. Later checks (the model) fail the
    batch after validating instead."""
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    keys = list(body)
    before = keys[: keys.index("requests")] if "requests" in body else keys
    # Parsed as a stream: a missing endpoint or model reads as the ordering error (WIRE-BATCH A2).
    if any(k not in before for k in ("endpoint", "model")) or ("callback_url" in body and "callback_url" not in before):
        return "'endpoint' and 'model' (and 'callback_url') must come before 'requests' in the request body."
    endpoint, model, requests = body["endpoint"], body["model"], body.get("requests")
    if endpoint not in OPENROUTER_ENDPOINTS:
        return f"Invalid endpoint {endpoint!r}; expected one of {', '.join(OPENROUTER_ENDPOINTS)}."
    if endpoint != CHAT:
        return f"The simulator serves only {CHAT} batches."
    if not isinstance(model, str) or not model:
        return "'model' must be a model slug."
    if body.get("completion_window", "24h") != "24h":
        return "'completion_window' must be '24h'."
    if not isinstance(requests, list) or not requests:
        return "'requests' must be a non-empty array."
    if len(requests) > OPENROUTER_MAX_REQUESTS:  # 400: the status for this limit is open question 10
        return f"A batch holds at most {OPENROUTER_MAX_REQUESTS:,} requests; got {len(requests):,}."
    return _requests_problem(requests, model)


def _requests_problem(requests: Sequence[Any], model: str) -> str | None:
    seen: set[str] = set()
    for n, r in enumerate(requests):
        if not (isinstance(r, dict) and isinstance(r.get("custom_id"), str) and r["custom_id"]
                and isinstance(r.get("body"), dict)):
            return f"requests[{n}] must be an object with a non-empty string 'custom_id' and an object 'body'."
        if r["custom_id"] in seen:
            return f"Duplicate custom_id {r['custom_id']!r}: custom_id must be unique within a batch."
        seen.add(r["custom_id"])
        line_model = r["body"].get("model")
        if line_model is not None and line_model != model:
            return (f"requests[{n}] ({r['custom_id']}) sets model {line_model!r}, not the batch model "
                    f"{model!r}: a batch takes one model.")
    return None


def openrouter_lines(body: Mapping[str, Any]) -> tuple[Line, ...]:
    return tuple(Line(r["custom_id"], r["body"]) for r in body["requests"])


def openrouter_batch(cfg: SimConfig, b: SimBatch, now: float, *, inline: bool) -> dict[str, Any]:
    """The batch object (WIRE-BATCH A3); ``inline`` lets GET carry ``results`` as batch_inline_results says."""
    status, reached = b.status(now), b.reached(now)
    completed, failed, expired = b.counts(now)
    results = b.results(now)
    show = inline and results is not None and (cfg.batch_inline_results == "terminal" or status == "completed")
    usage = None
    if results is not None:
        p, c, cost = _answered(results)
        usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "cost": cost, "is_byok": False}
    return {
        "id": b.id, "object": "batch", "endpoint": b.endpoint, "model": b.model, "completion_window": "24h",
        "status": status, "created_at": int(b.created_wall),
        "finalized_at": reached[status] if status in TERMINAL else None,
        "expires_at": int(b.created_wall + b.timeline.window), "provider": "Sim",
        "request_counts": {"total": len(b.lines), "completed": completed, "failed": failed + expired},
        "usage": usage,
        "results": [openrouter_line(cfg, b, r) for r in results] if show and results is not None else None,
        "error": {"message": b.errors[0]["message"]} if status == "failed" else None,
    }


def openrouter_line(cfg: SimConfig, b: SimBatch, r: LineResult) -> dict[str, Any]:
    """One result (WIRE-BATCH A5): exactly one of ``response`` and ``error`` is set. The error ``type``
    values are the simulator's (open question 5); ``error_type`` appears on upstream failures only."""
    rid = token(cfg.seed, "req", b.id, r.custom_id)
    line: dict[str, Any] = {"id": f"batch_req_{rid}", "custom_id": r.custom_id, "response": None, "error": None}
    if r.kind == "ok":
        line["response"] = {"status_code": 200, "request_id": f"req_{rid}",
                            "body": completion(b, r, f"gen-batch-{rid}", openrouter=True)}
    elif r.kind in ("expired", "cancelled"):
        line["error"] = {"type": f"batch_{r.kind}", "message": EXPIRED_MESSAGE if r.kind == "expired"
                         else "The batch was cancelled before this request ran.", "param": None}
    else:
        line["error"] = {"type": r.outcome.code, "message": r.outcome.message, "param": None}
        if r.outcome.status >= 500:
            line["error"]["error_type"] = "provider_error"
    return line


def encode_cursor(batch_id: str, offset: int) -> str:
    """An opaque cursor; the same batch and offset always give the same cursor and the same page."""
    return base64.urlsafe_b64encode(f"{batch_id}:{offset}".encode()).decode()


def decode_cursor(cursor: str, batch_id: str, size: int) -> int | None:
    """The offset a cursor of this batch points at, or None for a cursor this batch did not give."""
    try:
        owner, _, offset = base64.urlsafe_b64decode(cursor.encode()).decode().rpartition(":")
        n = int(offset)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return n if owner == batch_id and 0 <= n <= size else None


# --- OpenAI -----------------------------------------------------------------------------------


def create_problem(body: Any, files: Mapping[str, SimFile]) -> tuple[str, str | None] | None:
    """Why ``POST /v1/batches`` answers 400 at once: (message, param), or None."""
    if not isinstance(body, dict):
        return "The request body must be a JSON object.", None
    f = files.get(body.get("input_file_id") or "")
    if f is None or f.purpose != "batch":
        return f"Invalid 'input_file_id': {body.get('input_file_id')!r} is not a file with purpose 'batch'.", \
            "input_file_id"
    endpoint = body.get("endpoint")
    if endpoint not in OPENAI_ENDPOINTS:
        return f"Invalid 'endpoint': expected one of {', '.join(OPENAI_ENDPOINTS)}.", "endpoint"
    if endpoint != CHAT:
        return f"The simulator serves only {CHAT} batches.", "endpoint"
    if body.get("completion_window") != "24h":
        return "Invalid 'completion_window': expected '24h'.", "completion_window"
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in metadata.items())):
        return "Invalid 'metadata': at most 16 string pairs, keys up to 64 and values up to 512 characters.", \
            "metadata"
    return None


def parse_input(content: bytes, endpoint: str) -> tuple[tuple[Line, ...], tuple[dict[str, Any], ...], str]:
    """An input file's (lines, validation errors, model). Errors do not refuse the create call: they
    fail the batch when validating ends, each with the 1-based line it was found on."""
    numbered = [(n, raw) for n, raw in enumerate(content.splitlines(), 1) if raw.strip()]
    if not numbered:
        return (), ({"code": "empty_file", "line": None, "message": "The input file has no requests."},), ""
    if len(numbered) > OPENAI_MAX_REQUESTS:
        return (), ({"code": "too_many_requests", "line": None, "message": f"The input file has "
                     f"{len(numbered):,} requests; a batch holds at most {OPENAI_MAX_REQUESTS:,}."},), ""
    lines: list[Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model = ""
    for n, raw in numbered:
        problem, line = _input_line(raw, endpoint, seen, model)
        if problem is not None:
            errors.append({"code": problem[0], "line": n, "message": problem[1]})
        elif line is not None:
            model = model or str(line.body["model"])
            seen.add(line.custom_id)
            lines.append(line)
    return tuple(lines), tuple(errors[:MAX_FILE_ERRORS]), model


def _input_line(raw: bytes, endpoint: str, seen: set[str], model: str) -> tuple[tuple[str, str] | None, Line | None]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ("invalid_json_line", "This line is not parseable as valid JSON."), None
    if not (isinstance(obj, dict) and isinstance(obj.get("custom_id"), str) and obj["custom_id"]
            and isinstance(obj.get("body"), dict) and isinstance(obj["body"].get("model"), str)):
        return ("invalid_request", "Each line needs a string 'custom_id' and a 'body' object with 'model'."), None
    if obj.get("method") != "POST":
        return ("invalid_method", "Only the POST method is supported."), None
    if obj.get("url") != endpoint:
        return ("invalid_url", f"The url {obj.get('url')!r} does not match the batch endpoint {endpoint}."), None
    if obj["custom_id"] in seen:
        return ("duplicate_custom_id", f"The custom_id {obj['custom_id']!r} is a duplicate of another "
                "request's; custom_id must be unique within a batch."), None
    if model and obj["body"]["model"] != model:
        return ("mismatched_model", f"The model {obj['body']['model']!r} differs from {model!r}: a batch "
                "input file may only use one model."), None
    return None, Line(obj["custom_id"], obj["body"])


def file_object(f: SimFile) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": len(f.content), "created_at": f.created_at,
            "filename": f.filename, "purpose": f.purpose, "status": "processed", "status_details": None,
            "expires_at": f.expires_at}


def openai_batch(book: BatchBook, b: SimBatch, now: float) -> dict[str, Any]:
    """The batch object (WIRE-BATCH B2); a terminal batch gets its output and error files on first sight."""
    status, reached = b.status(now), b.reached(now)
    completed, failed, expired = b.counts(now)
    results = b.results(now)
    out_id, err_id = result_files(book, b, now) if results is not None else (None, None)
    p, c, _ = _answered(results or ())
    return {
        "id": b.id, "object": "batch", "endpoint": b.endpoint, "model": b.model or None,
        "errors": {"object": "list", "data": [{"code": e["code"], "line": e.get("line"), "message": e["message"],
                                               "param": None} for e in b.errors]} if status == "failed" else None,
        "input_file_id": b.extra["input_file_id"], "completion_window": "24h", "status": status,
        "output_file_id": out_id, "error_file_id": err_id, "created_at": int(b.created_wall),
        "expires_at": int(b.created_wall + b.timeline.window),
        **{f"{name}_at": reached.get(name) for name in STATUS_TIMES},
        # all 0 until validated, as the guide says of a fresh batch
        "request_counts": {"total": len(b.lines) if "in_progress" in reached else 0, "completed": completed,
                           "failed": failed + expired},
        "metadata": b.extra.get("metadata"),
        "usage": {"input_tokens": p, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": c,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": p + c},
    }


def result_files(book: BatchBook, b: SimBatch, now: float) -> tuple[str | None, str | None]:
    """(output_file_id, error_file_id) of a terminal batch, made once; None where a file would be empty.
    Lines a cancel kept from running are in neither file."""
    if "output_file_id" not in b.extra:
        results = b.results(now) or ()
        lines = {kind: [openai_line(book.config, b, r) for r in results if r.kind in kinds]
                 for kind, kinds in (("output", ("ok",)), ("error", ("error", "expired")))}
        expires = b.extra.get("output_expires_after") or THIRTY_DAYS
        for kind, rows in lines.items():
            content = b"".join(orjson.dumps(row) + b"\n" for row in rows)
            made = book.add_file(f"batch_{b.id}_{kind}.jsonl", "batch_output", content, expires) if rows else None
            b.extra[f"{kind}_file_id"] = made.id if made else None
    return b.extra["output_file_id"], b.extra["error_file_id"]


def openai_line(cfg: SimConfig, b: SimBatch, r: LineResult) -> dict[str, Any]:
    """One output or error file line (WIRE-BATCH B3): a failure takes either documented shape
    (batch_error_shape), an expired line always ``response: null`` with ``batch_expired``."""
    rid = token(cfg.seed, "req", b.id, r.custom_id)
    line: dict[str, Any] = {"id": f"batch_req_{rid}", "custom_id": r.custom_id, "response": None, "error": None}
    o = r.outcome
    if r.kind == "ok":
        line["response"] = {"status_code": 200, "request_id": rid,
                            "body": completion(b, r, f"chatcmpl-{rid}", openrouter=False)}
    elif r.kind == "expired":
        line["error"] = {"code": "batch_expired", "message": EXPIRED_MESSAGE}
    elif _error_shape(cfg, r.custom_id) == "response":
        kind = "server_error" if o.status >= 500 else "invalid_request_error"
        line["response"] = {"status_code": o.status, "request_id": rid, "body": {"error": {
            "message": o.message, "type": kind, "param": None, "code": None if o.code == kind else o.code}}}
    else:
        line["error"] = {"code": o.code, "message": o.message}
    return line


def _error_shape(cfg: SimConfig, custom_id: str) -> str:
    if cfg.batch_error_shape != "mixed":
        return cfg.batch_error_shape
    return "response" if draw(cfg.seed, "error-shape", custom_id) < 0.5 else "error"
