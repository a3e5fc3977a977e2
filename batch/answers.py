"""Checking answers against the job's ``[output_format]``: labels, a JSON schema, or a regex.

The router asks ``Checker.check(text)`` of every answer; it returns the
``parsed`` value (a label, a dict shaped like the Arrow struct of the schema,
or a regex capture) or the reason the answer is invalid. An invalid answer is
repaired: ``repair_messages`` appends the model's answer and what was wrong,
and the same model is asked again (see router.py).

JSON Schema support is a subset, checked with the standard library: the
keywords below, which cover what OpenAI's and OpenRouter's structured outputs
accept. A schema using any other keyword is refused when the job is loaded,
so nothing is ever silently left unvalidated.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

SUPPORTED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "enum", "const",
    "minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minItems", "maxItems", "description", "title", "$schema", "default", "examples",
})
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
NORMALIZERS: dict[str, Callable[[str], str]] = {
    "strip": str.strip,
    "casefold": str.casefold,
    "strip_punctuation": lambda s: s.strip().strip(string.punctuation + "\u201c\u201d\u2018\u2019 ").strip(),
    "first_line": lambda s: s.strip().split("\n", 1)[0],
    "collapse_spaces": lambda s: " ".join(s.split()),
}
_FENCE_RE = re.compile(r"^\s*```[\w-]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


# --- schema: checked at load time, validated per answer ------------------------------------

def schema_problems(schema: Any, where: str = "json_schema") -> list[str]:
    """Keywords or values the validator cannot honour; empty when the schema is usable."""
    if not isinstance(schema, dict):
        return [f"{where}: expected a JSON object (a table), got {type(schema).__name__}"]
    problems = []
    for key in schema:
        if key not in SUPPORTED_KEYWORDS:
            problems.append(f"{where}.{key}: unsupported JSON Schema keyword (supported: "
                            f"{', '.join(sorted(k for k in SUPPORTED_KEYWORDS if not k.startswith('$')))})")
    types = schema.get("type")
    for t in types if isinstance(types, list) else [types] if types is not None else []:
        if not isinstance(t, str) or t not in _TYPES:
            problems.append(f"{where}.type: unknown type {t!r}; expected one of {', '.join(_TYPES)}")
    for key, kind, what in (("properties", dict, "a table of schemas"), ("items", dict, "one schema (a table)"),
                            ("required", list, "a list of property names"), ("enum", list, "a list"),
                            ("pattern", str, "a string")):
        if key in schema and not isinstance(schema[key], kind):
            problems.append(f"{where}.{key}: expected {what}, got {_short(schema[key])}")
    for key in ("minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum",
                "exclusiveMaximum"):
        if key in schema and (isinstance(schema[key], bool) or not isinstance(schema[key], (int, float))):
            problems.append(f"{where}.{key}: expected a number, got {_short(schema[key])}")
    if isinstance(schema.get("required"), list) and not all(isinstance(r, str) for r in schema["required"]):
        problems.append(f"{where}.required: expected a list of property names")
    if isinstance(schema.get("properties"), dict):
        for name, sub in schema["properties"].items():
            problems += schema_problems(sub, f"{where}.properties.{name}")
    if isinstance(schema.get("items"), dict):
        problems += schema_problems(schema["items"], f"{where}.items")
    if isinstance(schema.get("pattern"), str):
        try:
            re.compile(schema["pattern"])
        except re.error as exc:
            problems.append(f"{where}.pattern: not a valid regular expression: {exc}")
    if not isinstance(schema.get("additionalProperties", True), bool):
        problems.append(f"{where}.additionalProperties: only true or false is supported")
    return problems


def validate(value: Any, schema: Mapping[str, Any], path: str = "$") -> str | None:
    """The first way ``value`` breaks ``schema``, said for a person (and a model), or None."""
    if "const" in schema and value != schema["const"]:
        return f"{path} must be {orjson.dumps(schema['const']).decode()}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path} must be one of {orjson.dumps(schema['enum']).decode()}, got {_short(value)}"
    types = schema.get("type")
    if types is not None:
        allowed = types if isinstance(types, list) else [types]
        if not any(_is_type(value, t) for t in allowed):
            return f"{path} must be {' or '.join(allowed)}, got {_short(value)}"
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                return f"{path} is missing required property {name!r}"
        props = schema.get("properties") or {}
        if schema.get("additionalProperties") is False:
            extra = [k for k in value if k not in props]
            if extra:
                return f"{path} has unexpected properties {extra[:3]} (allowed: {list(props)})"
        for name, sub in props.items():
            if name in value and (err := validate(value[name], sub, f"{path}.{name}")):
                return err
    elif isinstance(value, list):
        if err := _size_problem(path, len(value), schema, "minItems", "maxItems", "items"):
            return err
        if isinstance(items := schema.get("items"), dict):
            for i, v in enumerate(value):
                if err := validate(v, items, f"{path}[{i}]"):
                    return err
    elif isinstance(value, str):
        if err := _size_problem(path, len(value), schema, "minLength", "maxLength", "characters"):
            return err
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return f"{path} must match /{schema['pattern']}/"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if "integer" in _types_of(schema) and "number" not in _types_of(schema) and not -_INT64 <= value < _INT64:
            return f"{path} is {value}, beyond the 64-bit integers a Parquet column holds"
        for key, ok in (("minimum", value >= schema.get("minimum", value)),
                        ("maximum", value <= schema.get("maximum", value)),
                        ("exclusiveMinimum", "exclusiveMinimum" not in schema or value > schema["exclusiveMinimum"]),
                        ("exclusiveMaximum", "exclusiveMaximum" not in schema or value < schema["exclusiveMaximum"])):
            if not ok:
                return f"{path} breaks {key} {schema[key]}, got {value}"
    return None


_INT64 = 2**63


def _types_of(schema: Mapping[str, Any]) -> tuple[str, ...]:
    t = schema.get("type")
    return tuple(t) if isinstance(t, list) else (t,) if isinstance(t, str) else ()


def _size_problem(path: str, size: int, schema: Mapping[str, Any], low: str, high: str, unit: str) -> str | None:
    if size < schema.get(low, 0):
        return f"{path} needs at least {schema[low]} {unit}"
    if high in schema and size > schema[high]:
        return f"{path} allows at most {schema[high]} {unit}"
    return None


_PY_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None), "number": (int, float),
}


def _is_type(value: Any, t: str) -> bool:
    if t == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if t == "number" and isinstance(value, bool):
        return False
    return isinstance(value, _PY_TYPES[t])


def _short(value: Any) -> str:
    text = json_text(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def arrow_type(schema: Mapping[str, Any]) -> pa.DataType:
    """The Parquet column type for values of ``schema``: structs and lists where the schema says
    what is inside, JSON text where it does not (or allows several types)."""
    t = schema.get("type")
    if t == "object" and schema.get("properties"):
        return pa.struct([(name, arrow_type(sub)) for name, sub in schema["properties"].items()])
    if t == "array" and isinstance(schema.get("items"), dict):
        return pa.list_(arrow_type(schema["items"]))
    return {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(),
            "boolean": pa.bool_()}.get(t if isinstance(t, str) else "", pa.string())


def arrow_converter(typ: pa.DataType) -> Callable[[Any], Any]:
    """A function shaping a validated value for ``typ`` (JSON text for the parts kept as strings).
    Built once per job: asking pyarrow about types per row cost ~10 us."""
    if pa.types.is_struct(typ):
        fields = [(typ.field(i).name, arrow_converter(typ.field(i).type)) for i in range(typ.num_fields)]

        def struct(value: Any) -> Any:
            if not isinstance(value, dict):
                return None
            return {name: convert(value.get(name)) for name, convert in fields}
        return struct
    if pa.types.is_list(typ):
        item = arrow_converter(typ.value_type)
        return lambda value: [item(v) for v in value] if isinstance(value, list) else None
    if pa.types.is_string(typ):
        return lambda value: value if value is None or isinstance(value, str) else json_text(value)
    if pa.types.is_integer(typ):
        return lambda value: None if value is None else int(value)
    if pa.types.is_floating(typ):
        return lambda value: None if value is None else float(value)
    return lambda value: value


def json_text(value: Any) -> str:
    """``value`` as JSON text; integers beyond 64 bits (which orjson refuses) through the standard library."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, default=str)


# --- the checker ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Checker:
    """Validates answers for one job. Built from ``[output_format]`` by ``make_checker``."""

    kind: str  # "labels" | "json_schema" | "regex"
    labels: Mapping[str, str]  # normalised -> the label as the job wrote it
    normalize: tuple[Callable[[str], str], ...]
    schema: Mapping[str, Any] | None
    pattern: re.Pattern[str] | None
    parsed_type: pa.DataType
    expectation: str  # what a valid answer is, for repair messages
    to_arrow: Callable[[Any], Any] = lambda value: value

    def check(self, text: str) -> tuple[Any, str | None]:
        """(parsed value, None) for a valid answer; (None, why not) for an invalid one."""
        if self.kind == "labels":
            key = text
            for step in self.normalize:
                key = step(key)
            label = self.labels.get(key)
            if label is None:
                return None, f"{_short(text)} is not one of the labels"
            return label, None
        if self.kind == "regex":
            assert self.pattern is not None
            m = self.pattern.search(text)
            if m is None:
                return None, f"the answer does not match /{self.pattern.pattern}/"
            return (m.group(1) if m.re.groups else m.group(0)), None
        assert self.schema is not None
        body = text
        if (fenced := _FENCE_RE.match(text)) is not None:
            body = fenced.group(1)  # a ```json fence around the object: common, and harmless
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return None, f"the answer is not valid JSON ({str(exc).split(':', 1)[0]})"
        if (err := validate(value, self.schema)) is not None:
            return None, err
        return self.to_arrow(value), None

    def repair_messages(self, answer: str, error: str) -> list[dict[str, str]]:
        """What to append to the conversation to ask for a valid answer."""
        return [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"That answer is invalid: {error}. Reply again with {self.expectation}, "
                                        "and nothing else."},
        ]


def make_checker(kind: str, *, labels: Sequence[str] = (), normalize: Sequence[str] = ("strip", "casefold"),
                 schema: Mapping[str, Any] | None = None, regex: str | None = None) -> Checker:
    steps = tuple(NORMALIZERS[n] for n in normalize)
    if kind == "labels":
        table: dict[str, str] = {}
        for label in labels:
            key = label
            for step in steps:
                key = step(key)
            table.setdefault(key, label)
        expectation = f"exactly one of ({'/'.join(labels)})"
        return Checker(kind, table, steps, None, None, pa.string(), expectation)
    if kind == "regex":
        assert regex is not None
        return Checker(kind, {}, steps, None, re.compile(regex), pa.string(), f"text matching /{regex}/")
    assert schema is not None
    expectation = "only a JSON value that follows this JSON schema: " + orjson.dumps(schema).decode()
    typ = arrow_type(schema)
    return Checker(kind, {}, steps, schema, None, typ, expectation, arrow_converter(typ))


def schema_instruction(schema: Mapping[str, Any]) -> str:
    """Added to the system prompt for json_schema formats: models without structured outputs
    need the schema in words, and OpenAI's json_object mode needs the word JSON in the prompt."""
    return "Answer with only a JSON value that follows this JSON schema: " + orjson.dumps(schema).decode()


def resolve_response_format(mode: str, kind: str, supported: tuple[str, ...] | None) -> str:
    """What to send to one model: ``supported`` is what the catalog knows it accepts (None: unknown,
    so structured outputs are tried; a 400 then falls back like any rejected request)."""
    if kind != "json_schema" or mode == "none":
        return "none"
    if mode != "auto":
        return mode
    if supported is None or "json_schema" in supported:
        return "json_schema"
    return "json_object" if "json_object" in supported else "none"


def response_format(schema: Mapping[str, Any] | None, mode: str) -> dict[str, Any] | None:
    """The ``response_format`` request field for a mode ("json_schema" | "json_object" | "none")."""
    if mode == "json_schema" and schema is not None:
        return {"type": "json_schema", "json_schema": {"name": "output", "strict": False, "schema": schema}}
    if mode == "json_object":
        return {"type": "json_object"}
    return None
