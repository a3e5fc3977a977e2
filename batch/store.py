"""The output directory as a dataset: its part files, what they hold, and repairs to it.

``results/part-NNNNN.parquet`` files are one Parquet dataset with one row per
input id at every instant: parts appear atomically, and a row redone by
``--retry-errors`` replaces its old row inside the same part (batch/sinks.py),
so no reader ever sees an id twice or misses one. Parts are ordered by their
number, never by name (``part-100000`` sorts before ``part-99999`` by name).

``Ledger`` reads ``id``, ``status`` and ``finish_reason`` of every part so a
rerun skips ids already answered; it stays in Arrow (no Python set per id).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.atomic import fsync_dir, replacing, write_atomic
from batch.errors import OutputError

RESULTS_DIR = "results"
SHARDS_DIR = "ray"  # a Ray run's per-worker answers (batch/ray_shards.py), until they are in parts
MANIFEST = "manifest.json"
_PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")


def part_number(path: Path) -> int:
    m = _PART_RE.match(path.name)
    if m is None:
        raise ValueError(f"{path.name} is not a part file")
    return int(m.group(1))


def part_path(results: Path, number: int) -> Path:
    return results / f"part-{number:05d}.parquet"


def part_files(results: Path) -> list[Path]:
    """The part files of a results directory, oldest (lowest number) first."""
    if not results.is_dir():
        return []
    return sorted((p for p in results.iterdir() if _PART_RE.match(p.name)), key=part_number)


def next_part_number(results: Path) -> int:
    parts = part_files(results)
    return part_number(parts[-1]) + 1 if parts else 1


def read_parts(paths: list[Path], columns: list[str] | None = None) -> list[tuple[int, pa.Table]]:
    """(part number, table) for each part that still exists: a part a running run rewrote between the
    listing and the read is read in its new version; one deleted meanwhile (--fresh) is skipped."""
    tables = []
    for path in paths:
        try:
            tables.append((part_number(path), pq.read_table(path, columns=columns)))
        except FileNotFoundError:
            continue
    return tables


def error_rows(out_dir: Path) -> dict[str, tuple[int, str]]:
    """The output's error rows by error_type: (how many, the first one's message). Reads only error rows'
    columns' worth of Python objects, part by part: called at the end of a run that has error rows."""
    found: dict[str, tuple[int, str]] = {}
    for _, t in read_parts(part_files(out_dir / RESULTS_DIR), ["status", "error_type", "error_message"]):
        errors = t.filter(pc.equal(t["status"], "error"))
        for kind, message in zip(errors["error_type"].to_pylist(), errors["error_message"].to_pylist()):
            key = kind or "unknown"
            count, example = found.get(key, (0, message or ""))
            found[key] = (count + 1, example)
    return dict(sorted(found.items(), key=lambda item: -item[1][0]))


def ids_answered_by(out_dir: Path, batch_ids: set[str]) -> set[str]:
    """The ids of result rows a provider batch (by its provider id) answered: what a collection a crash
    interrupted already wrote. Reads ``id`` and ``batch_id`` part by part; outputs without lanes have none."""
    found: set[str] = set()
    if not batch_ids:
        return found
    wanted = pa.array(sorted(batch_ids), pa.string())
    for path in part_files(out_dir / RESULTS_DIR):
        if "batch_id" not in pq.read_schema(path).names:
            continue
        for _, t in read_parts([path], ["id", "batch_id"]):
            found.update(t.filter(pc.is_in(t["batch_id"], value_set=wanted))["id"].to_pylist())
    return found


class Ledger:
    """What the output already holds, one entry per id, with the part that holds it."""

    def __init__(self, table: pa.Table) -> None:
        self.ids: pa.Array = table["id"].combine_chunks()
        self.status: pa.Array = table["status"].combine_chunks()
        self.finish: pa.Array = table["finish_reason"].combine_chunks()
        self.part: pa.Array = table["part"].combine_chunks()

    @classmethod
    def read(cls, out_dir: Path) -> Ledger:
        tables = [t.append_column("part", pa.array([n] * t.num_rows, pa.int32()))
                  for n, t in read_parts(part_files(out_dir / RESULTS_DIR), ["id", "status", "finish_reason"])]
        if not tables:
            empty = pa.array([], pa.string())
            return cls(pa.table({"id": empty, "status": empty, "finish_reason": empty,
                                 "part": pa.array([], pa.int32())}))
        return cls(pa.concat_tables(tables, promote_options="default"))

    @property
    def ok(self) -> int:
        return int(pc.sum(pc.equal(self.status, "ok")).as_py() or 0)

    @property
    def errors(self) -> int:
        return len(self.ids) - self.ok

    def skip_set(self, *, retry_errors: bool, retry_truncated: bool) -> pa.Array:
        """Ids this run leaves alone: ok rows, and error rows unless they are to be redone."""
        keep = pc.equal(self.status, "ok") if retry_errors else pa.array([True] * len(self.ids))
        if retry_truncated and len(self.ids):
            keep = pc.and_(keep, pc.invert(pc.fill_null(pc.equal(self.finish, "length"), False)))
        return pc.filter(self.ids, keep) if len(self.ids) else self.ids

    def parts_of(self, ids: pa.ChunkedArray | pa.Array) -> pa.Array:
        """For each of ``ids``, the number of the part holding its row, or -1 (one vectorised lookup)."""
        where = pc.index_in(ids, value_set=self.ids)
        return pc.fill_null(pc.take(self.part, where), -1).combine_chunks() if len(self.ids) else \
            pa.array([-1] * len(ids), pa.int32())


def set_aside_damaged(out_dir: Path) -> list[str]:
    """Rename part files that cannot be read to hidden ``.NAME.damaged``; their rows are redone."""
    damaged = []
    for path in part_files(out_dir / RESULTS_DIR):
        try:
            pq.read_metadata(path)
            pq.read_table(path, columns=["id", "status"])
        except (pa.ArrowException, OSError):
            path.rename(path.with_name(f".{path.name}.damaged"))
            damaged.append(path.name)
    return damaged


def reconcile(out_dir: Path) -> int:
    """Keep only the newest row of every id: rewrite older parts without superseded rows.

    Outputs written by batch before 0.2 could hold an id twice after a crash in
    a ``--retry-*`` run (the new row was written before the old one was
    removed). A run (which holds the output's lock) repairs that first.
    Returns rows removed.
    """
    parts = part_files(out_dir / RESULTS_DIR)
    if len(parts) < 2:
        return 0
    ids = read_parts(parts, ["id"])
    numbered = pa.table({
        "id": pa.chunked_array([c for _, t in ids for c in t["id"].chunks], pa.string()),
        "part": pa.array([n for n, t in ids for _ in range(t.num_rows)], pa.int32()),
    })
    latest = numbered.group_by("id").aggregate([("part", "max"), ("part", "count")])
    dup = latest.filter(pc.greater(latest["part_count"], 1))
    if dup.num_rows == 0:
        return 0
    newest = dict(zip(dup["id"].to_pylist(), dup["part_max"].to_pylist()))
    removed = 0
    for number, table_ids in ids:
        stale = [rid in newest and newest[rid] != number for rid in table_ids["id"].to_pylist()]
        if any(stale):
            removed += _drop_rows(part_path(out_dir / RESULTS_DIR, number), stale)
    return removed


def _drop_rows(path: Path, stale: list[bool]) -> int:
    table = pq.read_table(path)
    kept = table.filter(pc.invert(pa.array(stale)))
    if kept.num_rows == 0:
        path.unlink()
        fsync_dir(path.parent)
    else:
        with replacing(path) as tmp:
            pq.write_table(kept, tmp, compression="zstd")
    return int(table.num_rows - kept.num_rows)


def unified_schema(parts: list[Path]) -> pa.Schema:
    """One schema for every part: parts written by a job whose columns changed (--force) differ."""
    return pa.unify_schemas([pq.read_schema(p) for p in parts], promote_options="permissive")


def compact(out_dir: Path, dest: Path) -> int:
    """Write the whole results dataset as one Parquet file (atomically); returns its rows."""
    parts = part_files(out_dir / RESULTS_DIR)
    if not parts:
        raise OutputError(f"{out_dir}: no results to compact")
    try:
        schema = unified_schema(parts)
    except (pa.ArrowException, OSError) as exc:
        raise OutputError(f"{out_dir}: the parts' columns cannot be combined ({exc}); they come from jobs "
                          "with different output columns (mixed with --force)") from None
    rows = 0
    try:
        with replacing(dest) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for path in parts:  # one part in memory at a time
                table = _conform(pq.read_table(path), schema)
                writer.write_table(table)
                rows += table.num_rows
    except OSError as exc:
        raise OutputError(f"{dest}: cannot write: {exc.strerror or exc}") from None
    return rows


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order; columns it lacks are null."""
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST
    try:
        return orjson.loads(path.read_bytes())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise OutputError(f"{path}: unreadable manifest ({exc}); move it away or run with --fresh") from None


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    try:
        write_atomic(out_dir / MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    except OSError as exc:
        raise OutputError(f"{out_dir / MANIFEST}: cannot write the manifest: {exc.strerror or exc}") from None
