"""The simulator's answers: deterministic text, structured JSON, truncation and token counts.

Everything here is a pure function of the request, so a row gets the same
answer whatever order requests arrive in, and tests can compute the answer a
row must have (``answer_for``) without a server.

- ``answer_for``: if the last user message offers choices as ``(a/b/c)`` one is
  picked by a hash of the conversation, else ``"sim <hash> <first words>"``.
- ``structured_answer``: with ``response_format`` ``json_schema`` (or a message
  saying ``JSON schema: {...}``, as batch's [output_format] instruction does) a
  JSON instance of the schema, its values drawn from the prompt's words; with
  ``json_object`` alone, ``{"answer": ...}``.
- ``usage_for``: a stand-in tokenizer (words in pieces of at most eight
  characters, each punctuation mark one token, plus OpenAI's chat framing of 4
  per message and 3 for the reply) and OpenRouter's ``usage.cost`` from the
  built-in price table (unknown models: ``DEFAULT_PRICES``).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Mapping
from typing import Any

import orjson

from batch.catalog import facts_for

DEFAULT_PRICES = (1.0, 2.0)  # USD per million input / output tokens, for models the catalog does not know
_TOKEN_RE = re.compile(r"\w{1,8}|[^\w\s]")
_CHOICES_RE = re.compile(r"\(([\w-]+(?:/[\w-]+)+)\)")


def count_tokens(text: str) -> int:
    """The simulator's stand-in tokenizer (see the module docstring)."""
    return len(_TOKEN_RE.findall(text))


def _conversation(messages: list[dict[str, Any]]) -> str:
    """Every non-system message's text: a plain prompt is its one user message; a repair
    conversation (answer, then a correction) differs per row even when the correction does not."""
    texts = []
    for m in messages:
        if m.get("role") == "system":
            continue
        content = m.get("content")
        texts.append(content if isinstance(content, str) else orjson.dumps(content).decode())
    return "\x1e".join(texts)


def prompt_key(messages: list[dict[str, Any]]) -> str:
    """The key under which the simulator counts a prompt: its conversation without system messages."""
    return hashlib.blake2b(_conversation(messages).encode(), digest_size=8).hexdigest()


def answer_for(messages: list[dict[str, Any]]) -> str:
    """The deterministic answer to a prompt, before any max_tokens truncation."""
    last = ""
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            last = m["content"]
            break
    digest = hashlib.blake2b(_conversation(messages).encode(), digest_size=8).digest()
    choices = _CHOICES_RE.search(last)
    if choices:
        options = choices.group(1).split("/")
        return options[int.from_bytes(digest[:4], "big") % len(options)]
    words = " ".join(last.split()[:6])
    return f"sim {digest.hex()[:8]} {words}".strip()


_SCHEMA_MARK = "JSON schema:"


def structured_answer(messages: list[dict[str, Any]], body: Mapping[str, Any]) -> str | None:
    """The JSON answer when the request asks for one (see the module docstring), else None."""
    given = body.get("response_format")
    fmt: Mapping[str, Any] = given if isinstance(given, dict) else {}
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if fmt.get("type") == "json_schema" and isinstance(spec, dict) else None
    if schema is None:
        for m in messages:
            content = m.get("content")
            if isinstance(content, str) and _SCHEMA_MARK in content:
                with contextlib.suppress(orjson.JSONDecodeError, ValueError):
                    text = content.split(_SCHEMA_MARK, 1)[1]
                    schema = orjson.loads(text[text.index("{"):text.rindex("}") + 1])
    last = next((m["content"] for m in reversed(messages)
                 if m.get("role") == "user" and isinstance(m.get("content"), str)), "")
    if isinstance(schema, dict):
        return orjson.dumps(instance_of(schema, last, "$")).decode()
    if fmt.get("type") == "json_object":
        return orjson.dumps({"answer": answer_for(messages)}).decode()
    return None


def instance_of(schema: Mapping[str, Any], prompt: str, path: str) -> Any:
    """A deterministic value that follows ``schema``, drawn from a hash of the prompt and the path."""
    h = int.from_bytes(hashlib.blake2b(f"{path}:{prompt}".encode(), digest_size=8).digest(), "big")
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][h % len(schema["enum"])]
    t = schema.get("type")
    t = t[0] if isinstance(t, list) else t
    if t == "object":
        return {k: instance_of(sub, prompt, f"{path}.{k}") for k, sub in (schema.get("properties") or {}).items()}
    if t == "array":
        n = max(schema.get("minItems", 1), min(schema.get("maxItems", 3), 1 + h % 3))
        return [instance_of(schema.get("items") or {"type": "string"}, prompt, f"{path}[{i}]") for i in range(n)]
    if t in ("integer", "number"):
        lo = schema.get("minimum", 0)
        hi = schema.get("maximum", lo + 100)
        value = lo + h % (int(hi - lo) + 1)
        return value if t == "integer" else float(value)
    if t == "boolean":
        return bool(h & 1)
    if t == "null":
        return None
    words = prompt.split() or ["sim"]
    return words[h % len(words)].strip(".,!?;:\"'()")[: schema.get("maxLength", 40)] or "sim"


def invalid_version(answer: str) -> str:
    """What a model that ignores the format answers instead: prose, or JSON cut short."""
    if answer.lstrip().startswith(("{", "[")):
        return answer[: max(1, len(answer) // 2)]
    return "unsure"


def truncate(text: str, max_tokens: int | None) -> tuple[str, str]:
    """Cut ``text`` to ``max_tokens`` sim tokens; returns (text, finish_reason)."""
    if max_tokens is None:
        return text, "stop"
    pieces = list(_TOKEN_RE.finditer(text))
    if len(pieces) <= max_tokens:
        return text, "stop"
    end = pieces[max_tokens - 1].end() if max_tokens > 0 else 0
    return text[:end], "length"


def sim_prices(model: str) -> tuple[float, float]:
    """USD per million (input, output) tokens the simulator bills ``model`` at: the catalog, else DEFAULT_PRICES."""
    facts = facts_for(model)
    return (facts.price_input_per_million, facts.price_output_per_million) if facts else DEFAULT_PRICES


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """The prompt tokens the simulator reports for ``messages`` (its tokenizer plus chat framing)."""
    prompt = 3
    for m in messages:
        content = m.get("content")
        text = content if isinstance(content, str) else orjson.dumps(content).decode()
        prompt += 4 + count_tokens(text)
    return prompt


def usage_for(messages: list[dict[str, Any]], completion: str, model: str) -> dict[str, Any]:
    prompt = prompt_tokens(messages)
    completion_tokens = count_tokens(completion)
    p_in, p_out = sim_prices(model)
    cost = (prompt * p_in + completion_tokens * p_out) / 1_000_000
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "cost": round(cost, 12),
    }
