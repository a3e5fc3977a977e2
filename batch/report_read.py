"""Report, stage 1: an output directory's files -> Arrow tables and plain values.

Reads ``results/``, ``attempts/`` (the attempt log), ``stats.parquet`` and
``manifest.json`` of a finished run, a running one, or one copied from a
server; never the network, never the output's lock. Every one of those files
appears atomically (hidden temporary name, then rename), so a reader sees
whole files or none. A running run may still replace or delete a part between
our listing and our read (``reconcile`` rewrites older result parts): the
listing is then taken once more, and a part that is gone again is skipped
with a note. Columns a version does not write are added as nulls and extra
ones are ignored, so older and newer outputs both read.

Raises nothing for damaged or missing files: what could not be read becomes a
note that the report shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.attempts import ATTEMPTS_DIR
from batch.errors import OutputError
from batch.store import RESULTS_DIR, part_files, read_manifest
from batch.stats import STATS_FILE

_CATEGORY = pa.dictionary(pa.int32(), pa.string())  # repeated strings: read once per value, not per row

# The attempt log's columns (one row per HTTP attempt, cache hit or provider-batch line).
ATTEMPT_FIELDS: list[tuple[str, pa.DataType]] = [
    ("run_id", _CATEGORY), ("id", pa.string()), ("attempt", pa.int32()), ("lane", _CATEGORY),
    ("provider", _CATEGORY), ("model", _CATEGORY), ("level", pa.int32()),
    ("started", pa.timestamp("us", tz="UTC")), ("latency_ms", pa.float64()), ("status", pa.int32()),
    ("outcome", _CATEGORY), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("cost_usd", pa.float64()), ("then", _CATEGORY), ("error_message", _CATEGORY),
]
# The columns of the results the report uses; ``lane`` exists only in newer outputs.
RESULT_FIELDS: list[tuple[str, pa.DataType]] = [
    ("id", pa.string()), ("status", _CATEGORY), ("model", _CATEGORY), ("provider", _CATEGORY),
    ("fallback_level", pa.int32()), ("attempts", pa.int32()), ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()), ("cost_usd", pa.float64()), ("latency_ms", pa.float64()),
    ("error_type", _CATEGORY), ("error_message", _CATEGORY), ("cached", pa.bool_()), ("lane", _CATEGORY),
]
# stats.parquet columns the report adds up or shows; absent ones read as 0 (or null for percentiles).
STATS_COUNTS = ("requests", "ok", "errors", "retries", "rate_limited", "fallbacks_in", "prompt_tokens",
                "completion_tokens", "charged_failures", "cache_hits", "repairs", "invalid_outputs")
STATS_VALUES = ("cost_usd", "wall_seconds", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms")


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputFiles:
    """What an output directory holds, as read at one moment.

    ``attempts`` is None when there is no attempt log (outputs of older versions);
    ``notes`` says what was missing, unreadable or skipped.
    """

    out_dir: Path
    results: pa.Table
    attempts: pa.Table | None
    stats: list[dict[str, Any]]
    manifest: dict[str, Any] | None
    notes: tuple[str, ...]


def read_output(out_dir: Path) -> OutputFiles:
    """Read everything a report needs from ``out_dir``; problems become notes, not exceptions."""
    notes: list[str] = []
    manifest = _read_manifest(out_dir, notes)
    results = newest_per_id(read_dataset(out_dir / RESULTS_DIR, RESULT_FIELDS, notes)
                            or empty_table(RESULT_FIELDS), notes)
    if results.num_rows == 0:
        notes.append(f"no results yet in {out_dir / RESULTS_DIR}")
    attempts = None
    if (out_dir / ATTEMPTS_DIR).is_dir():
        attempts = read_dataset(out_dir / ATTEMPTS_DIR, ATTEMPT_FIELDS, notes) or empty_table(ATTEMPT_FIELDS)
    else:
        notes.append("no attempt log (attempts/): this output was written by a version of batch without it, "
                     "so the charts over time are missing; the rest comes from results and stats.parquet")
    return OutputFiles(out_dir=out_dir, results=results, attempts=attempts,
                       stats=_read_stats(out_dir, notes), manifest=manifest, notes=tuple(notes))


def part_paths(directory: Path) -> list[Path]:
    """The dataset's part files, in order; hidden names (temporary, set aside) are not parts."""
    try:
        return part_files(directory)
    except FileNotFoundError:  # removed between the check and the listing
        return []


def read_dataset(directory: Path, fields: Sequence[tuple[str, pa.DataType]], notes: list[str], *,
                 list_parts: Callable[[Path], list[Path]] = part_paths) -> pa.Table | None:
    """All parts of ``directory`` conformed to ``fields``; None when there is no part.

    ``list_parts`` is the listing (a seam for tests that replay a listing gone stale).
    """
    paths = list_parts(directory)
    tables: dict[Path, pa.Table] = {}
    gone: list[Path] = []
    for relisted in (False, True):
        for path in paths:
            if path in tables:
                continue
            try:
                tables[path] = _read_part(path, fields)
            except FileNotFoundError:
                gone.append(path)  # replaced or deleted by a running run since the listing
            except (pa.ArrowException, OSError) as exc:
                notes.append(f"{path}: unreadable, skipped ({exc})")
                tables[path] = empty_table(fields)
        if not gone or relisted:
            break
        paths, gone = list_parts(directory), []  # take the listing once more: the part may have a new name
    for path in gone:
        notes.append(f"{path}: disappeared while being read (a running run rewrote it), skipped")
    found = [t for t in tables.values() if t.num_rows]
    if not tables:
        return None
    return pa.concat_tables(found) if found else empty_table(fields)


def newest_per_id(results: pa.Table, notes: list[str]) -> pa.Table:
    """One row per id, the newest (highest part) one.

    A redo (--retry-errors) writes the new row in a new part before it rewrites
    the older part without the old row; a report taken in between sees both.
    """
    if results.num_rows == 0 or pc.count_distinct(results["id"]).as_py() == results.num_rows:
        return results  # the usual case costs one hash pass
    numbered = pa.table({"id": results["id"], "i": pa.array(range(results.num_rows), pa.int64())})
    newest = numbered.group_by("id", use_threads=False).aggregate([("i", "max")])["i_max"]
    notes.append(f"{results.num_rows - len(newest)} rows were being redone as this was read: "
                 "each id is counted once, with its newest row")
    return results.take(pc.take(newest, pc.sort_indices(newest)))  # kept rows in part order


def _read_part(path: Path, fields: Sequence[tuple[str, pa.DataType]]) -> pa.Table:
    # One open: a rename over the path after this keeps our handle on the old, complete file.
    with open(path, "rb") as f:
        present = set(pq.read_schema(f).names)
        f.seek(0)
        pf = pq.ParquetFile(f, read_dictionary=[n for n, t in fields if t == _CATEGORY and n in present])
        table = pf.read(columns=[n for n, _ in fields if n in present], use_threads=True)
    return conform(table, fields)


def conform(table: pa.Table, fields: Sequence[tuple[str, pa.DataType]]) -> pa.Table:
    """``table`` with exactly ``fields``: missing columns become nulls, others are cast (or nulled if they cannot be)."""
    columns = []
    for name, dtype in fields:
        if name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, dtype))
            continue
        column = table[name]
        if column.type != dtype:
            try:
                column = column.cast(dtype)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                column = pa.chunked_array([pa.nulls(table.num_rows, dtype)])
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def empty_table(fields: Sequence[tuple[str, pa.DataType]]) -> pa.Table:
    return pa.schema(fields).empty_table()


def _read_manifest(out_dir: Path, notes: list[str]) -> dict[str, Any] | None:
    try:
        manifest = read_manifest(out_dir)
    except OutputError as exc:
        notes.append(str(exc))
        return None
    if manifest is None:
        notes.append(f"no manifest.json in {out_dir}: the runs and their limits are unknown")
    elif not isinstance(manifest, dict) or not isinstance(manifest.get("runs", []), list):
        notes.append(f"{out_dir / 'manifest.json'}: not a batch manifest, ignored")
        return None
    return manifest


def _read_stats(out_dir: Path, notes: list[str]) -> list[dict[str, Any]]:
    """stats.parquet as one dict per (run, model), with every known key present."""
    path = out_dir / STATS_FILE
    try:
        rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    except FileNotFoundError:
        notes.append("no stats.parquet yet: it is written when a run ends")
        return []
    except (pa.ArrowException, OSError) as exc:
        notes.append(f"{path}: unreadable ({exc})")
        return []
    for r in rows:
        for key in STATS_COUNTS:
            r[key] = int(r.get(key) or 0)
        r["cost_usd"] = float(r.get("cost_usd") or 0.0)
        r["wall_seconds"] = float(r.get("wall_seconds") or 0.0)
        for key in STATS_VALUES[2:]:
            r.setdefault(key, None)
        r["errors_by_type"] = dict(r.get("errors_by_type") or [])
        r["run_id"] = str(r.get("run_id") or "")
        r["key"] = model_key(r.get("provider"), r.get("model"))
    return rows


def model_key(provider: object, model: object) -> str:
    """``PROVIDER:MODEL``, as the manifest's limits are keyed; unknown parts show as ``?``."""
    return f"{provider if provider is not None else '?'}:{model if model is not None else '?'}"
