"""After a run: an output directory's results -> OpenAI Batch output lines.

``batch export OUT --format openai-batch FILE.jsonl`` writes one line per
result, as OpenAI's Batch API writes its output file, so code written for it
keeps working::

    {"id": "batch_req_...", "custom_id": "...", "error": null,
     "response": {"status_code": 200, "request_id": null, "body": {chat.completion}}}

An ``error`` row becomes ``"response": null, "error": {"code": error_type,
"message": ...}``; with ``--errors FILE`` those lines go to a second file, as
OpenAI splits its output and error files. The ``body`` is the provider's reply
exactly as received when the job kept it (``output.raw_response = true``);
otherwise it is rebuilt from the result columns (id, model, the answer,
finish_reason, usage), which is what most readers of the format look at.
``request_id`` is null: batch does not record the provider's request id.
Lines follow the part files, not the input order (OpenAI's do not either):
join on ``custom_id``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow.parquet as pq

from batch.atomic import replacing
from batch.errors import OutputError
from batch.store import RESULTS_DIR, part_files

_COLUMNS = ("id", "status", "output", "finish_reason", "model", "prompt_tokens", "completion_tokens",
            "error_type", "error_message", "response_body")


def export_openai_batch(out_dir: Path, dest: Path, errors_dest: Path | None = None) -> tuple[int, int]:
    """Write ``dest`` (and ``errors_dest``) atomically; returns (ok lines, error lines)."""
    parts = part_files(out_dir / RESULTS_DIR)
    if not parts:
        raise OutputError(f"{out_dir}: no results to export; is it the output.path of a job that has run?")
    ok = failed = 0
    try:
        with replacing(dest) as tmp, open(tmp, "wb") as f:
            if errors_dest is None:
                ok, failed = _write_lines(parts, f, f)
            else:
                with replacing(errors_dest) as etmp, open(etmp, "wb") as ef:
                    ok, failed = _write_lines(parts, f, ef)
    except OSError as exc:
        raise OutputError(f"{dest}: cannot write: {exc.strerror or exc}") from None
    return ok, failed


def _write_lines(parts: list[Path], ok_file: IO[bytes], error_file: IO[bytes]) -> tuple[int, int]:
    ok = failed = 0
    dumps = orjson.dumps
    for path in parts:  # one record batch in memory at a time
        created = int(path.stat().st_mtime)  # when the part was written: within seconds of the answers
        pf = pq.ParquetFile(path)
        columns = [c for c in _COLUMNS if c in pf.schema_arrow.names]
        for rb in pf.iter_batches(batch_size=4096, columns=columns, use_threads=False):
            lines_ok: list[bytes] = []
            lines_err: list[bytes] = []
            for row in rb.to_pylist():
                if row["status"] == "ok":
                    lines_ok.append(dumps(_ok_line(row, created)))
                else:
                    lines_err.append(dumps(_error_line(row)))
            ok += len(lines_ok)
            failed += len(lines_err)
            if lines_ok:
                ok_file.write(b"\n".join(lines_ok) + b"\n")
            if lines_err:
                error_file.write(b"\n".join(lines_err) + b"\n")
    return ok, failed


def _line_id(custom_id: str) -> str:
    """A stable ``batch_req_`` id per custom_id (custom_ids are unique in a job)."""
    return "batch_req_" + hashlib.blake2b(custom_id.encode(), digest_size=12).hexdigest()


def _ok_line(row: dict[str, Any], created: int) -> dict[str, Any]:
    raw = row.get("response_body")
    body: Any = orjson.Fragment(raw) if raw else _rebuilt_body(row, created)
    return {"id": _line_id(row["id"]), "custom_id": row["id"],
            "response": {"status_code": 200, "request_id": None, "body": body}, "error": None}


def _rebuilt_body(row: dict[str, Any], created: int) -> dict[str, Any]:
    prompt = row["prompt_tokens"] or 0
    completion = row["completion_tokens"] or 0
    return {
        "id": "chatcmpl-" + _line_id(row["id"]).removeprefix("batch_req_"),
        "object": "chat.completion",
        "created": created,
        "model": row["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": row["output"]},
                     "finish_reason": row["finish_reason"], "logprobs": None}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def _error_line(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": _line_id(row["id"]), "custom_id": row["id"], "response": None,
            "error": {"code": row["error_type"], "message": row["error_message"]}}
