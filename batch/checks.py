"""Checks for job-file values: collect every problem with its dotted key, then raise once.

Each problem names the key (``models[1].tokens_per_minute``), what was
expected and what was found; unknown keys name the closest valid key.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batch.errors import JobError

TYPE_NAMES = {
    str: "a string",
    int: "a positive integer",
    float: "a positive number",
    bool: "true or false",
    list: "a list of strings",
    dict: "a table",
}


class Problems:
    """Collects every problem of a job file, so the user fixes them in one go."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.lines.append(f"{key}: {message}")

    def raise_if_any(self) -> None:
        if self.lines:
            body = "\n  ".join(self.lines)
            raise JobError(f"{self.source}: invalid job file\n  {body}")


def check_keys(
    table: Mapping[str, Any], allowed: tuple[str, ...], where: str, problems: Problems
) -> None:
    for key in table:
        if key in allowed:
            continue
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(allowed)}"
        problems.add(f"{where}{key}", f"unknown key{hint}")


def get(
    table: Mapping[str, Any],
    key: str,
    kind: type,
    where: str,
    problems: Problems,
    default: Any = None,
    *,
    required: bool = False,
    positive: bool = True,
) -> Any:
    if key not in table:
        if required:
            problems.add(f"{where}{key}", f"required, expected {TYPE_NAMES[kind]}")
        return default
    value = table[key]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if kind is list and ok:
        ok = all(isinstance(v, str) for v in value)
    if ok and positive and kind in (int, float) and value <= 0:
        ok = False
    if ok and kind is str and not value.strip():
        ok = False
    if not ok:
        problems.add(f"{where}{key}", f"expected {TYPE_NAMES[kind]}, got {value!r}")
        return default
    return value


def choice(table: Mapping[str, Any], key: str, choices: tuple[str, ...], where: str, problems: Problems,
            default: str) -> str:
    """A string key that must be one of ``choices``; ``default`` when absent or invalid (the problem is noted)."""
    value = get(table, key, str, where, problems, default)
    if key in table and value not in choices:
        problems.add(f"{where}{key}", f"expected one of {', '.join(choices)}, got {table[key]!r}")
        return default
    return str(value)


def table(root: Mapping[str, Any], key: str, problems: Problems) -> dict[str, Any]:
    value = root.get(key, {})
    if not isinstance(value, dict):
        problems.add(key, "expected a table, e.g. [" + key + "]")
        return {}
    return value
