"""Before anything is sent: the job's prompt builder, output schema, fingerprint,
and a streaming scan of the whole input for problems that block a run.

``scan`` reads every row once (only the needed columns), so that a broken
line at row 800,000 or a repeated id stops the run with exit 2 *before* the
first request, not in the middle of the night. Ids are collected as Arrow
arrays (about 10 bytes per id), not as a Python set.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.answers import schema_instruction
from batch.errors import InputError, Interrupted
from batch.job import Job
from batch.prompts import PromptBuilder, Request
from batch.sources import BadLine, KeysSeen, RowBatch, count_rows, read_batches
from batch.tokens import HEURISTIC, TokenCounter

MAX_REPORTED = 5
DEFAULT_MAX_TOKENS = 256  # completion reserve when the job sets no max_tokens


@dataclass(slots=True)
class Plan:
    job: Job
    builder: PromptBuilder
    keep_types: list[tuple[str, pa.DataType]]
    total_rows: int | None

    def batches(self, on_bad_line: BadLine | None = None, keys_seen: KeysSeen | None = None
                ) -> Iterator[RowBatch]:
        return read_batches(self.job.input.path, self.job.input.format, self.builder.columns, on_bad_line,
                            keys_seen)

    @property
    def prompt_fields(self) -> dict[str, str]:
        """The columns a prompt is made of, each with the job key that names it: without one, no row can
        be sent."""
        inp = self.job.input
        fields = {name: f"input.template field {{{name}}}" for name in
                  (self.builder.template.fields if self.builder.template else ())}
        if inp.messages_column and inp.format != "openai-batch":
            fields[inp.messages_column] = "input.messages_column"
        return fields

    @property
    def max_tokens(self) -> int:
        r = self.job.request
        value = r.get("max_tokens", r.get("max_completion_tokens"))
        return int(value) if isinstance(value, int) and value > 0 else DEFAULT_MAX_TOKENS


def make_plan(job: Job, counter: TokenCounter = HEURISTIC) -> Plan:
    inp = job.input
    chain = "|".join(f"{m.provider}:{m.model}" for m in job.models)
    fmt = job.output_format
    instruction = schema_instruction(fmt.json_schema) if fmt and fmt.json_schema is not None and fmt.instruct \
        else None
    builder = PromptBuilder(
        template=inp.template, messages_column=inp.messages_column, system=inp.system,
        instruction=instruction,
        id_column=inp.id_column, keep_columns=inp.keep_columns, request_fields=job.request, chain_key=chain,
        counter=counter, batch_file=inp.format == "openai-batch", keep_body_model=inp.body_model == "keep",
        cache_all=job.run.cache_nondeterministic,
        # [output_format] sends its own response_format with each model: a Batch line's would be a duplicate key
        drop_body_fields=("response_format",) if fmt is not None and fmt.kind == "json_schema"
        and fmt.response_format != "none" else (),
    )
    return Plan(job, builder, _keep_types(job), count_rows(inp.path, inp.format))


def _keep_types(job: Job) -> list[tuple[str, pa.DataType]]:
    """Parquet keeps its column types; JSONL values are strings (JSON for non-strings)."""
    cols = job.input.keep_columns
    if job.input.format == "parquet" and job.input.path.exists():
        try:
            schema = pq.read_schema(job.input.path)
            return [(c, schema.field(c).type if c in schema.names else pa.string()) for c in cols]
        except (pa.ArrowException, OSError):
            pass  # the scan reports the unreadable file
    return [(c, pa.string()) for c in cols]


@dataclass(slots=True)
class ScanReport:
    """Everything wrong with an input, found in one streaming pass."""

    rows: int = 0
    bad_lines: int = 0  # lines that are not a JSON object
    bad_line_examples: list[str] = field(default_factory=list)
    missing_ids: int = 0
    missing_id_examples: list[str] = field(default_factory=list)
    bad_rows: int = 0  # rows that cannot become a request (null or missing field, bad messages)
    bad_examples: list[str] = field(default_factory=list)
    bad_by_type: dict[str, int] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    column_problems: list[str] = field(default_factory=list)
    ids: pa.ChunkedArray | None = None  # every row's id, in input order ("" for none); about 11 bytes per id
    unsupported: int = 0  # OpenAI Batch lines for another endpoint than chat completions
    unsupported_examples: list[str] = field(default_factory=list)
    body_models: dict[str, int] = field(default_factory=dict)  # OpenAI Batch lines per body.model ("keep")

    def skip_mask(self, skip: pa.Array) -> pa.Array | None:
        """Which input rows are already answered: one set lookup for the whole input."""
        if self.ids is None or len(skip) == 0:
            return None
        return pc.is_in(self.ids, value_set=skip).combine_chunks()

    def note(self, req: Request) -> None:
        """Count one row's request: the model it names, or its problem with a few examples."""
        if req.problem is None:
            if req.model is not None:
                self.body_models[req.model] = self.body_models.get(req.model, 0) + 1
            return
        kind, message = req.problem
        if kind == "missing_id":
            self.missing_ids += 1
            if len(self.missing_id_examples) < MAX_REPORTED:
                self.missing_id_examples.append(message)
            return
        if kind == "unsupported_request":
            self.unsupported += 1
            if len(self.unsupported_examples) < MAX_REPORTED:
                self.unsupported_examples.append(message)
            return
        self.bad_rows += 1
        self.bad_by_type[kind] = self.bad_by_type.get(kind, 0) + 1
        if len(self.bad_examples) < MAX_REPORTED:
            self.bad_examples.append(f"{kind}: {message}")

    def blocking(self, on_bad_row: str) -> list[str]:
        """Problems that stop a run before anything is sent (exit 2)."""
        problems = list(self.column_problems)
        if self.rows == 0 and not self.bad_lines and not self.column_problems:  # else not read at all
            problems.append("the input has no rows")
        if self.duplicates:
            problems.append("ids must be unique; repeated: " + "; ".join(self.duplicates))
        if on_bad_row != "skip":
            if self.unsupported:
                problems.append(f"{self.unsupported} lines are not chat-completions requests, e.g. "
                                + "; ".join(self.unsupported_examples)
                                + " (or set run.on_bad_row = \"skip\" to leave them out)")
            if self.bad_lines:
                problems.append(f"{self.bad_lines} lines are not JSON objects, e.g. "
                                + "; ".join(self.bad_line_examples)
                                + " (fix them, or set run.on_bad_row = \"skip\" to leave them out)")
            if self.missing_ids:
                problems.append(f"{self.missing_ids} rows have no id, e.g. " + "; ".join(self.missing_id_examples)
                                + " (every row needs an id to be resumable; or set run.on_bad_row = \"skip\")")
        if on_bad_row == "fail" and self.bad_rows:
            problems.append(f"{self.bad_rows} rows cannot be sent (run.on_bad_row = \"fail\"), e.g. "
                            + "; ".join(self.bad_examples))
        return problems


def scan(plan: Plan, interrupted: Callable[[], bool] = lambda: False) -> ScanReport:
    """Read the whole input once; report what would stop or spoil a run.

    ``interrupted`` is asked between batches: a Ctrl-C during a long scan stops it at once
    (``Interrupted``), before anything is sent."""
    report = ScanReport()

    def bad_line(lineno: int, message: str) -> None:
        report.bad_lines += 1
        if len(report.bad_line_examples) < MAX_REPORTED:
            report.bad_line_examples.append(message)

    report.column_problems = _column_problems(plan)
    if report.column_problems:
        return report
    id_arrays: list[pa.Array] = []
    # JSONL has no schema: a column the job names that no line has is a typo (keep_columns would be all null)
    fields = {**{c: "input.keep_columns" for c in plan.job.input.keep_columns}, **plan.prompt_fields}
    keys_seen = KeysSeen(list(fields)) if fields and plan.job.input.format == "jsonl" else None
    for batch in plan.batches(on_bad_line=bad_line, keys_seen=keys_seen):
        if interrupted():
            raise Interrupted("interrupted while checking the input; nothing was sent. Rerun the same command "
                              "to start")
        ids = plan.builder.ids(batch)
        id_arrays.append(pa.array(ids, pa.string()))
        report.rows += batch.size
        for req in plan.builder.build(batch, ids, None, encode=False):
            report.note(req)
    report.ids = pa.chunked_array(id_arrays, pa.string())
    if keys_seen is not None and keys_seen.unseen and report.rows:
        where = f"keys seen in its {report.rows} rows"
        report.column_problems = [absent_column(fields[f], f, list(keys_seen.keys), where)
                                  for f in fields if f in keys_seen.unseen]
    if id_arrays:
        report.duplicates = _duplicates(report.ids, plan)
    return report


def _column_problems(plan: Plan) -> list[str]:
    """Parquet columns that are missing or whose type cannot serve their role, found from the schema alone."""
    inp = plan.job.input
    if inp.format != "parquet" or not inp.path.exists():
        return []
    try:
        schema = pq.read_schema(inp.path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{inp.path}: not a readable Parquet file: {exc}") from None
    needed = {c: "input.keep_columns" for c in inp.keep_columns}
    if inp.id_column:
        needed[inp.id_column] = "input.id_column"
    needed.update(plan.prompt_fields)  # a column of several roles is named by the one that stops every row
    problems = [absent_column(role, name, schema.names, "its columns") for name, role in needed.items()
                if name not in schema.names]
    fields = plan.builder.template.fields if plan.builder.template else ()
    for name in fields:
        if name in schema.names and pa.types.is_nested(schema.field(name).type):
            problems.append(f"column {name!r} has type {schema.field(name).type}; template fields need text or "
                            "numbers (use messages_column for chat messages)")
    if inp.messages_column and inp.messages_column in schema.names:
        t = schema.field(inp.messages_column).type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_string(t)
                or pa.types.is_large_string(t)):
            problems.append(f"column {inp.messages_column!r} has type {t}; messages_column needs a list of "
                            "{role, content} structs or a JSON string")
    if inp.id_column and inp.id_column in schema.names and pa.types.is_nested(schema.field(inp.id_column).type):
        problems.append(f"column {inp.id_column!r} has type {schema.field(inp.id_column).type}; ids must be "
                        "text or numbers")
    return problems


def absent_column(role: str, name: str, columns: list[str], where: str) -> str:
    """A column the job names and the input does not have: a job error, with the closest column there is."""
    close = difflib.get_close_matches(name, columns, n=1) or [c for c in columns if c.casefold() == name.casefold()]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{role}: no column {name!r} in the input{hint} ({where}: {', '.join(columns) or 'none'})"


def _duplicates(ids: pa.ChunkedArray, plan: Plan) -> list[str]:
    """Repeated ids, by sorting (about 20 bytes per id, no hash table), then where they are."""
    if pc.any(pc.equal(ids, "")).as_py():  # rows without an id are reported elsewhere; a copy only if any
        ids = pc.filter(ids, pc.not_equal(ids, ""))
    if len(ids) < 2:
        return []
    ordered = pc.take(ids, pc.sort_indices(ids)).combine_chunks()
    same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
    repeated = pc.unique(pc.filter(ordered.slice(1), same))
    del ordered, same
    if len(repeated) == 0:
        return []
    names = repeated.slice(0, MAX_REPORTED).to_pylist()
    where: dict[str, list[str]] = {n: [] for n in names}
    for batch in plan.batches(on_bad_line=lambda n, m: None):  # second pass only when there is something to report
        for i, rid in enumerate(plan.builder.ids(batch)):
            if rid in where and len(where[rid]) < 3:
                where[rid].append(batch.where(i))
    more = f" (and {len(repeated) - len(names)} more)" if len(repeated) > len(names) else ""
    return [f"{n!r} at {', '.join(where[n])}" for n in names[:-1]] + \
           [f"{names[-1]!r} at {', '.join(where[names[-1]])}{more}"]


def fingerprint(job: Job) -> dict[str, Any]:
    """Everything that changes answers (or the results' columns). Comparing two tells the user what changed.

    Keys added after the first release appear only when set, so outputs of
    earlier versions keep matching their unchanged jobs.
    """
    fp: dict[str, Any] = {
        "input": input_identity(job.input.path),
        "template": job.input.template,
        "messages_column": job.input.messages_column,
        "system": job.input.system,
        "id_column": job.input.id_column,
        "models": [f"{m.provider}:{m.model}" for m in job.models],
        "request": dict(job.request),
    }
    if job.input.keep_columns:  # they are columns of the results: parts of one output must agree
        fp["keep_columns"] = list(job.input.keep_columns)
    if job.input.format == "openai-batch":
        fp["body_model"] = job.input.body_model
    if job.output.raw_response:
        fp["raw_response"] = True
    if (fmt := job.output_format) is not None:  # response_format and repairs change answers
        fp["output_format"] = {"kind": fmt.kind, "labels": list(fmt.labels), "normalize": list(fmt.normalize),
                               "json_schema": fmt.json_schema, "regex": fmt.regex, "max_repairs": fmt.max_repairs,
                               "response_format": fmt.response_format, "instruct": fmt.instruct}
    return fp


def input_identity(path: Path) -> dict[str, Any]:
    """Name, size and a hash of the first and last MiB: cheap on a 10 GB file."""
    try:
        size = path.stat().st_size
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), 2)
                h.update(f.read())
        return {"name": path.name, "size": size, "sample_hash": h.hexdigest()}
    except OSError as exc:
        raise InputError(f"{path}: cannot read input: {exc.strerror or exc}") from None


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one line per key; the input as names and sizes."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changes.append(f"input ({input_change(old.get(key), new.get(key))})" if key == "input"
                           else f"{key}: {_short(old.get(key))} -> {_short(new.get(key))}")
    return changes


def input_change(old: Any, new: Any) -> str:
    """Two input identities (``input_identity``) as a reader says it: "rev.jsonl: 32,734 -> 32,798 bytes"."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return f"{_short(old)} -> {_short(new)}"
    name = new.get("name") if old.get("name") == new.get("name") else f"{old.get('name')} -> {new.get('name')}"
    size_old, size_new = old.get("size"), new.get("size")
    if not isinstance(size_old, int) or not isinstance(size_new, int):
        return f"{name}: {_short(size_old)} -> {_short(size_new)} bytes"
    if size_old == size_new:
        return f"{name}: {size_new:,} bytes, other content"
    return f"{name}: {size_old:,} -> {size_new:,} bytes"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def requests_of(plan: Plan, old_parts: pa.Array | None, ids: set[str], *, keep_problems: bool = False
                ) -> list[Request]:
    """The Requests of these rows, built from the input again (one read for a whole set); a redone row
    (--retry-*) carries the part holding its old result. ``keep_problems``: rows that cannot become a
    request too (the router makes them error rows)."""
    if not ids:
        return []
    found = []
    value_set = pa.array(sorted(ids), pa.string())
    for batch in plan.batches(on_bad_line=lambda n, m: None):
        row_ids = plan.builder.ids(batch)
        mask = pc.invert(pc.is_in(pa.array(row_ids, pa.string()), value_set=value_set)).to_pylist()
        if all(mask):
            continue
        parts = old_parts.slice(batch.start, batch.size).to_pylist() if old_parts is not None else None
        for r in plan.builder.build(batch, row_ids, mask):
            if r.problem is None or keep_problems:
                part = parts[r.row - batch.start] if parts is not None else -1
                found.append(r if part < 0 else r._replace(replaces=part))
    return found
