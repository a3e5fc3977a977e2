"""The simulator's knobs, read from ``SimConfig`` itself: a job's ``[sim]`` table and
``batch sim``'s flags are both made here from its fields, their types and the
Attributes section of its docstring, so a new knob is one field in one place.

Flag syntax, by the field's type: scalars ``--latency-ms 40``; booleans
``--report-cost`` / ``--no-report-cost``; lists repeatable or comma-separated
(``--retired a,b``); tables repeatable ``KEY=VALUE`` (``--fault 500=0.05``,
``--down MODEL=SECONDS``, ``--schedule '*=429:0.5,ok'``). A table or list
flag is named in the singular (``--fault``); its plural (``--faults``) works too.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, get_args, get_origin, get_type_hints

from batch.checks import Problems
from batch.sim_config import SimConfig

_NUMBER = (int, float)


@dataclass(frozen=True, slots=True)
class Knob:
    """One field of SimConfig: ``shape`` is scalar, list or table; ``item`` the type of a scalar,
    of a list's items, or of a table's values (``list`` for the schedule's lists of faults)."""

    name: str
    shape: str
    item: type
    default: Any
    help: str

    @property
    def flag(self) -> str:
        base = self.name
        if self.shape != "scalar":  # repeatable: one item per flag
            base = re.sub(r"ies$", "y", base) if base.endswith("ies") else base.removesuffix("s")
        return "--" + base.replace("_", "-")


def _help_texts() -> dict[str, str]:
    """``name: text`` entries of SimConfig's Attributes section; ``a, b: text`` gives both the text."""
    doc = SimConfig.__doc__ or ""  # python -OO strips docstrings: then flags go without help
    section = doc.split("Attributes:", 1)[-1] if "Attributes:" in doc else ""
    texts: dict[str, str] = {}
    names: list[str] = []
    for line in section.splitlines():
        head = re.match(r"\s{8}([\w*]+(?:, \w+)*): (.*)", line)
        if head:
            names = head.group(1).split(", ")
            for n in names:
                texts[n] = head.group(2).strip()
        elif line.strip() and names:
            for n in names:
                texts[n] += " " + line.strip()
    return texts


def _shape(hint: Any) -> tuple[str, type]:
    args = [a for a in get_args(hint) if a is not type(None)]
    origin = get_origin(hint)
    if origin is dict:
        value = args[1]
        return "table", get_origin(value) or value
    if origin is tuple:
        return "list", args[0]
    if args and get_origin(hint) is not None:  # X | None
        return "scalar", args[0]
    return "scalar", hint


def knobs() -> tuple[Knob, ...]:
    """Every field of SimConfig, in its order."""
    hints = get_type_hints(SimConfig)
    texts = _help_texts()
    defaults = SimConfig()
    out = []
    for f in fields(SimConfig):
        shape, item = _shape(hints[f.name])
        help_text = texts.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        out.append(Knob(f.name, shape, item, getattr(defaults, f.name), help_text))
    return tuple(out)


# --- a job's [sim] table --------------------------------------------------------------------


def _fits(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, _NUMBER) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


_WHAT = {float: "a number", int: "an integer", str: "a string", bool: "true or false", list: "a list of strings"}
_PLURAL = {float: "numbers", int: "integers", str: "strings", bool: "booleans", list: "lists of strings"}


def _check(k: Knob, value: Any) -> tuple[Any, str | None]:
    """(the value SimConfig takes, None) or (None, what was expected)."""
    if k.shape == "scalar":
        return (float(value) if k.item is float else value, None) if _fits(value, k.item) else \
            (None, f"expected {_WHAT[k.item]}, got {value!r}")
    if k.shape == "list":
        ok = isinstance(value, list) and all(_fits(v, k.item) for v in value)
        return (tuple(value), None) if ok else (None, f"expected a list of {_PLURAL[k.item]}, got {value!r}")
    ok = isinstance(value, dict) and all(_fits(v, k.item) for v in value.values())
    return (dict(value), None) if ok else (None, f"expected a table of names to {_PLURAL[k.item]}, got {value!r}")


def options_from_table(raw: Mapping[str, Any], p: Problems) -> dict[str, Any]:
    """A job's ``[sim]`` table, checked key by key against SimConfig's fields; problems go to ``p``."""
    by_name = {k.name: k for k in knobs()}
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in by_name:
            continue  # check_keys reported it, with the closest valid key
        converted, problem = _check(by_name[key], value)
        if problem is not None:
            p.add(f"sim.{key}", problem)
        else:
            options[key] = converted
    return options


# --- batch sim's flags ------------------------------------------------------------------------


def _scalar(kind: type, text: str, flag: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag}: expected {_WHAT[kind]}, got {text!r}") from None


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per knob (see the module docstring), each with its docstring text as help."""
    for k in knobs():
        names = [k.flag] + ([f"--{k.name.replace('_', '-')}"] if k.flag != f"--{k.name.replace('_', '-')}" else [])
        if k.shape == "scalar" and k.item is bool:
            parser.add_argument(*names, dest=k.name, action=argparse.BooleanOptionalAction, default=k.default,
                                help=k.help)
        elif k.shape == "scalar":
            parser.add_argument(*names, dest=k.name, type=str, default=None, metavar=_WHAT[k.item].split()[-1].upper(),
                                help=f"{k.help} (default: {k.default})")
        else:
            metavar = "KEY=VALUE" if k.shape == "table" else "ITEM[,ITEM]"
            parser.add_argument(*names, dest=k.name, action="append", default=[], metavar=metavar,
                                help=f"{k.help} (repeatable: {metavar})")


def config_from_flags(args: argparse.Namespace) -> SimConfig:
    """The SimConfig the flags describe; ValueError names the flag and what it expects."""
    given: dict[str, Any] = {}
    for k in knobs():
        value = getattr(args, k.name)
        if k.shape == "scalar":
            if value is not None and value != k.default:
                given[k.name] = value if k.item is bool else _parse_scalar(k, value)
        elif value:
            given[k.name] = _parse_list(k, value) if k.shape == "list" else _parse_table(k, value)
    for k in knobs():  # one knob at a time, so that a refusal names its flag
        if k.name in given:
            try:
                SimConfig(**{k.name: given[k.name]})
            except ValueError as exc:
                raise ValueError(f"{k.flag}: {exc}") from None
    return SimConfig(**given)


def _parse_scalar(k: Knob, text: str) -> Any:
    try:
        return _scalar(k.item, text, k.flag)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None


def _parse_list(k: Knob, given: list[str]) -> tuple[Any, ...]:
    items = [part.strip() for text in given for part in text.split(",") if part.strip()]
    return tuple(_parse_scalar(k, x) for x in items)


def _parse_table(k: Knob, given: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for text in given:
        key, eq, value = text.partition("=")
        if not eq or not key:
            raise ValueError(f"{k.flag} {text!r}: expected KEY=VALUE, e.g. {k.flag} {_EXAMPLES.get(k.name, 'x=1')}")
        if k.item is list:
            table[key] = [v.strip() for v in value.split(",") if v.strip()]
        else:
            table[key] = _parse_scalar(k, value)
    return table


_EXAMPLES = {"faults": "500=0.05", "down": "openai/gpt-3.5-turbo=30", "schedule": "'*=429:0.5,ok'",
             "context_windows": "small=4096", "odd_replies": "content_parts=0.1"}
