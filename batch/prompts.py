"""Stage 3: a ``RowBatch`` -> ``Request``s, each body encoded once.

A template such as ``"Label: {text}"`` is compiled once into a positional
format string, so rendering a row is one ``str.format`` call. The body
(messages plus the job's ``[request]`` fields) is encoded with orjson once per
row, *without* the model; ``Request.body_for(prefix)`` puts a model's prefix
(``{"model":"x",``) in front, so a fallback does not re-encode anything.

A row that cannot become a request (a null or missing template field, a
malformed messages value, no id) becomes a ``Request`` with ``problem`` set:
the router turns it into an ``error`` row without sending anything.

An OpenAI Batch file (``custom_id``, ``method``, ``url``, ``body`` per line)
is built the same way: the body minus its model is the tail, the job's
``[request]`` fields fill in what the body leaves out, and with
``body_model = "keep"`` the body's model travels along as ``Request.model``.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from batch.errors import JobError
from batch.sources import MISSING, RowBatch
from batch.tokens import HEURISTIC, TokenCounter


class Request(NamedTuple):
    """One row, ready to send to any model of the chain.

    A NamedTuple: one is built per row on the hot path, about 3x cheaper than
    a frozen dataclass, and just as immutable.
    """

    id: str
    row: int  # the row's 0-based position in the input
    tail: bytes  # the JSON body without its opening brace and without "model"
    prompt_tokens: int  # estimated
    request_hash: str
    keep: tuple[Any, ...]
    problem: tuple[str, str] | None = None  # (error_type, message) for a bad row
    cacheable: bool = False  # deterministic (temperature 0 or a seed), or the job caches everything
    model: str | None = None  # an OpenAI Batch line's own body.model (body_model = "keep")
    max_tokens: int | None = None  # an OpenAI Batch line's own max_tokens (None: the job's)
    replaces: int = -1  # redone rows (--retry-*): the number of the part holding the row's older result
    carried: tuple[float, int, int] = (0.0, 0, 0)  # (USD, prompt, completion tokens) billed in another lane

    def body_for(self, prefix: bytes) -> bytes:
        """The full body: a model's ``prefix`` (``{"model":"x",``) and this row's tail."""
        return prefix + self.tail


@dataclass(frozen=True, slots=True)
class Template:
    fields: tuple[str, ...]
    positional: str

    @classmethod
    def compile(cls, template: str) -> Template:
        """Turn ``{column}`` fields into positional ones; raise JobError if malformed."""
        fields: list[str] = []
        out: list[str] = []
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise JobError(f"input.template: {exc}; write literal braces as {{{{ and }}}}") from None
        for literal, name, spec, conv in parsed:
            out.append(literal.replace("{", "{{").replace("}", "}}"))
            if name is None:
                continue
            if not name:
                raise JobError("input.template: empty field {}; name a column, e.g. {text}")
            if name not in fields:
                fields.append(name)
            out.append("{" + str(fields.index(name)) + (f"!{conv}" if conv else "")
                       + (f":{spec}" if spec else "") + "}")
        return cls(tuple(fields), "".join(out))


BATCH_LINE_COLUMNS = ("custom_id", "method", "url", "body")
CHAT_URL_SUFFIX = "/chat/completions"
_BODY_SET_BY_BATCH = ("model", "messages", "stream", "stream_options")


def is_deterministic(fields: Mapping[str, Any]) -> bool:
    """Does a request ask for a reproducible answer (temperature 0, or a seed)?"""
    return fields.get("temperature") == 0 or fields.get("seed") is not None


class PromptBuilder:
    """Builds Requests for one job; construct once, then call ``build`` per batch."""

    def __init__(
        self,
        *,
        template: str | None,
        messages_column: str | None,
        system: str | None,
        id_column: str | None,
        keep_columns: Sequence[str],
        request_fields: Mapping[str, Any],
        chain_key: str,
        counter: TokenCounter = HEURISTIC,
        batch_file: bool = False,
        keep_body_model: bool = False,
        cache_all: bool = False,
        drop_body_fields: Sequence[str] = (),
        instruction: str | None = None,
    ) -> None:
        self.count_tokens = counter.count
        self.template = Template.compile(template) if template is not None else None
        self.messages_column = messages_column
        # the [output_format] schema instruction joins the job's system prompt, or a row's own
        self.system = "\n\n".join(filter(None, [system, instruction])) or None
        self.instruction = instruction
        self.batch_file = batch_file
        self.keep_body_model = keep_body_model
        self.cache_all = cache_all
        self._set_by_batch = (*_BODY_SET_BY_BATCH, *drop_body_fields)  # Batch-line fields batch replaces
        self.id_column = "custom_id" if batch_file else id_column
        self.keep_columns = tuple(keep_columns)
        self.request_fields = dict(request_fields)
        self._chain_key = chain_key.encode()
        needed: list[str] = list(BATCH_LINE_COLUMNS) if batch_file else []
        for c in (self.id_column, messages_column, *(self.template.fields if self.template else ()), *keep_columns):
            if c is not None and c not in needed:
                needed.append(c)
        self.columns: tuple[str, ...] = tuple(needed)

    def ids(self, batch: RowBatch) -> list[str]:
        """Each row's id as a string ("" when the id column has no value)."""
        if self.id_column is None:
            return [str(batch.start + i) for i in range(batch.size)]
        return ["" if v is None or v is MISSING else str(v) for v in batch.columns[self.id_column]]

    def build(self, batch: RowBatch, ids: list[str], skip: Sequence[bool] | None,
              *, encode: bool = True) -> Iterator[Request]:
        """Requests for the rows of ``batch`` not marked in ``skip``.

        With ``encode=False`` only the checks run (for scans): no body is built.
        """
        if self.batch_file:
            yield from self._build_batch_lines(batch, ids, skip, encode)
            return
        cols = batch.columns
        keeps = [cols[c] for c in self.keep_columns]
        if self.template is not None:
            fieldcols = [cols[f] for f in self.template.fields]
            texts: Iterator[Any] = zip(*fieldcols) if fieldcols else iter([()] * batch.size)
        else:
            texts = iter(cols[self.messages_column or ""])
        fields = self.request_fields
        sys_msg = {"role": "system", "content": self.system} if self.system else None
        fmt = self.template.positional if self.template else None
        chain_key = self._chain_key
        cacheable = self.cache_all or is_deterministic(fields)
        instruction = self.instruction
        for i, value in enumerate(texts):
            if skip is not None and skip[i]:
                continue
            index = batch.start + i
            rid = ids[i]
            keep = tuple(None if k[i] is MISSING else k[i] for k in keeps)
            if not rid:
                problem: tuple[str, str] | None = (
                    "missing_id", f"{batch.where(i)}: no value in id column {self.id_column!r}")
                messages = None
            elif fmt is not None:
                messages, problem = self._from_template(fmt, value, batch, i)
            else:
                messages, problem = _check_messages(value, batch.where(i), self.messages_column or "")
            if problem is not None or messages is None:
                yield Request(rid or f"row-{index}", index, b"", 0, "", keep, problem)
                continue
            if not encode:
                continue
            if sys_msg is not None and messages[0].get("role") != "system":
                messages.insert(0, sys_msg)
            elif instruction is not None and messages[0].get("role") == "system":
                messages[0] = _with_instruction(messages[0], instruction)
            tail = orjson.dumps({"messages": messages, **fields})[1:]
            digest = hashlib.blake2b(chain_key + tail, digest_size=16).hexdigest()
            yield Request(rid, index, tail, self.count_tokens(messages), digest, keep, None, cacheable)

    def _build_batch_lines(self, batch: RowBatch, ids: list[str], skip: Sequence[bool] | None,
                           encode: bool) -> Iterator[Request]:
        """Requests from OpenAI Batch lines: checked url and method, body as given."""
        cols = batch.columns
        keeps = [cols[c] for c in self.keep_columns]
        defaults = self.request_fields
        sys_msg = {"role": "system", "content": self.system} if self.system else None
        instruction = self.instruction
        for i, (method, url, body) in enumerate(zip(cols["method"], cols["url"], cols["body"])):
            if skip is not None and skip[i]:
                continue
            index = batch.start + i
            rid = ids[i]
            keep = tuple(None if k[i] is MISSING else k[i] for k in keeps)
            messages, problem, model = self._check_line(method, url, body, rid, batch.where(i))
            if problem is not None or messages is None:
                yield Request(rid or f"row-{index}", index, b"", 0, "", keep, problem)
                continue
            if not encode:
                if model is not None:
                    yield Request(rid, index, b"", 0, "", keep, None, False, model)  # the scan counts models
                continue
            if sys_msg is not None and messages[0].get("role") != "system":
                messages.insert(0, sys_msg)
            elif instruction is not None and messages[0].get("role") == "system":
                messages[0] = _with_instruction(messages[0], instruction)
            fields = {**defaults, **{k: v for k, v in body.items() if k not in self._set_by_batch}}
            tail = orjson.dumps({"messages": messages, **fields})[1:]
            key = self._chain_key + (model.encode() if model is not None else b"")
            digest = hashlib.blake2b(key + tail, digest_size=16).hexdigest()
            limit = fields.get("max_tokens", fields.get("max_completion_tokens"))
            yield Request(rid, index, tail, self.count_tokens(messages), digest, keep, None,
                          self.cache_all or is_deterministic(fields), model,
                          limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None)

    def _check_line(self, method: Any, url: Any, body: Any, rid: str, where: str
                    ) -> tuple[list[dict[str, Any]] | None, tuple[str, str] | None, str | None]:
        if not rid:
            return None, ("missing_id", f"{where}: no custom_id"), None
        if not isinstance(url, str) or not url.rstrip("/").endswith(CHAT_URL_SUFFIX):
            return None, ("unsupported_request", (f"{where}: url {url!r} is not chat completions; batch runs "
                          f"only \"/v1/chat/completions\" lines (move other endpoints to their own file)")), None
        if method is not MISSING and method != "POST":
            return None, ("unsupported_request", f"{where}: method {method!r}; Batch lines are POST"), None
        if not isinstance(body, dict):
            return None, ("bad_body", (f"{where}: 'body' must be a JSON object with messages, "
                          f"got {type(body).__name__ if body is not MISSING else 'nothing'}")), None
        messages, problem = _check_messages(body.get("messages", MISSING), where, "body.messages")
        model = body.get("model") if self.keep_body_model else None
        if model is not None and not isinstance(model, str):
            return None, ("bad_body", f"{where}: body.model must be a string, got {model!r}"), None
        return messages, problem, model

    def _from_template(
        self, fmt: str, values: tuple[Any, ...], batch: RowBatch, i: int
    ) -> tuple[list[dict[str, Any]] | None, tuple[str, str] | None]:
        assert self.template is not None
        for name, v in zip(self.template.fields, values):
            if v is MISSING:
                return None, ("missing_field", f"{batch.where(i)}: no field {name!r} for the template")
            if v is None:
                return None, ("null_field", f"{batch.where(i)}: field {name!r} is null")
            if isinstance(v, (dict, list, tuple, bytes)):
                return None, ("bad_field_type", (f"{batch.where(i)}: field {name!r} is a {type(v).__name__}; "
                              "template fields need text or numbers"))
        return [{"role": "user", "content": fmt.format(*values)}], None


def _with_instruction(message: dict[str, Any], instruction: str) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, str):
        return message  # structured content parts: left as the row wrote them
    return {**message, "content": f"{content}\n\n{instruction}"}


def _check_messages(value: Any, where: str, column: str) -> tuple[list[dict[str, Any]] | None, tuple[str, str] | None]:
    if isinstance(value, (str, bytes)):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None, ("bad_messages", f"{where}: column {column!r} is a string that is not JSON")
    if value is None or value is MISSING:
        return None, ("null_field", f"{where}: column {column!r} is null or missing")
    if not isinstance(value, list) or not value:
        return None, ("bad_messages", f"{where}: column {column!r} must be a non-empty list of messages")
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return None, ("bad_messages", f"{where}: each message needs 'role' and 'content', got {str(m)[:60]}")
    return [dict(m) for m in value], None
