"""Stage 8: what each model did -> ``stats.parquet`` rows and the run summary.

The router counts into one ``ModelStats`` per model (plain attribute
increments: this is the hot path). At the end each becomes an immutable
``Usage`` value; ``Usage`` values add, so totals are ``sum(usages, Usage())``.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batch.atomic import replacing

STATS_FILE = "stats.parquet"
BATCH_LANE_SUFFIX = "@batch"  # a model's counters for its provider Batch API lane: "openai/gpt-4.1-mini@batch"


@dataclass(slots=True, kw_only=True)
class Counts:
    """Counters that add up across requests, models and runs.

    Each field is a column of stats.parquet (int -> int64, float -> float64),
    summed by ``Usage.__add__`` and by ``batch stats``: a new counter is one
    line here.
    """

    requests: int = 0
    ok: int = 0
    retries: int = 0
    rate_limited: int = 0
    fallbacks_in: int = 0
    prompt_tokens: int = 0  # of the answers kept (one per ok row)
    completion_tokens: int = 0
    billed_prompt_tokens: int = 0  # of every billed reply: answers, repairs, invalid answers, billed failures
    billed_completion_tokens: int = 0
    cost_usd: float = 0.0
    charged_failures: int = 0
    cache_hits: int = 0  # rows answered from the response cache (not requests: nothing was sent)
    repairs: int = 0  # requests that asked again after an invalid answer ([output_format])
    invalid_outputs: int = 0  # answers that failed the output_format check
    flex_refusals: int = 0  # service_tier "flex" requests refused for want of capacity (not billed; fell back)
    second_answers: int = 0  # batch lines answered for rows already answered online: billed twice, kept once


COUNTERS: tuple[str, ...] = tuple(f.name for f in fields(Counts))
_ARROW = {int: pa.int64(), float: pa.float64(), "int": pa.int64(), "float": pa.float64()}


@dataclass(slots=True, kw_only=True)
class ModelStats(Counts):
    """Mutable counters for one model during one run (the router increments them: the hot path)."""

    label: str
    errors: Counter[str] = field(default_factory=Counter)  # by error_type, per failed attempt
    latencies: array[float] = field(default_factory=lambda: array("d"))  # 8 bytes per answered request
    gone: str | None = None  # the provider said this model does not exist (or was retired): out of the chain

    def freeze(self, wall_seconds: float) -> Usage:
        lat = sorted(self.latencies)
        return Usage(**{k: getattr(self, k) for k in COUNTERS}, errors=dict(self.errors), gone=self.gone,
                     latency_p50_ms=_pct(lat, 50), latency_p95_ms=_pct(lat, 95), latency_p99_ms=_pct(lat, 99),
                     wall_seconds=wall_seconds)


def _pct(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)  # nearest-rank
    return round(sorted_values[k], 3)


@dataclass(slots=True, kw_only=True)
class Usage(Counts):
    """What one model (or a total) did in one run; values add (``sum(usages, Usage())``)."""

    errors: dict[str, int] = field(default_factory=dict)
    gone: str | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    wall_seconds: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        errors = Counter(self.errors)
        errors.update(other.errors)
        return Usage(**{k: getattr(self, k) + getattr(other, k) for k in COUNTERS}, errors=dict(errors),
                     gone=self.gone or other.gone, wall_seconds=max(self.wall_seconds, other.wall_seconds))

    @property
    def requests_per_minute(self) -> float:
        return self.requests * 60 / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def tokens_per_minute(self) -> float:
        tokens = self.prompt_tokens + self.completion_tokens
        return tokens * 60 / self.wall_seconds if self.wall_seconds else 0.0


def lane_of(model_label: str) -> str:
    """The lane a stats row counts: "batch" for a model's Batch API counters, else "online"."""
    return "batch" if model_label.endswith(BATCH_LANE_SUFFIX) else "online"


def by_lane(per_model: dict[tuple[str, str], Usage]) -> dict[str, Usage]:
    """Per-model usage summed by lane; empty when the run used no batch lane (nothing to split)."""
    if not any(lane_of(model) == "batch" for _, model in per_model):
        return {}
    lanes: dict[str, Usage] = {}
    for (_, model), u in per_model.items():
        lane = lane_of(model)
        lanes[lane] = lanes.get(lane, Usage()) + u
    return dict(sorted(lanes.items()))


STATS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("model", pa.string()), ("provider", pa.string()),
    *((f.name, _ARROW[f.type]) for f in fields(Counts)),
    ("errors", pa.int64()), ("errors_by_type", pa.map_(pa.string(), pa.int64())),
    ("latency_p50_ms", pa.float64()), ("latency_p95_ms", pa.float64()), ("latency_p99_ms", pa.float64()),
    ("wall_seconds", pa.float64()), ("requests_per_minute", pa.float64()), ("tokens_per_minute", pa.float64()),
    ("gone", pa.string()),  # why the model left the chain (it does not exist or was retired), else null
])


def stats_rows(run_id: str, per_model: dict[tuple[str, str], Usage]) -> list[dict[str, Any]]:
    rows = []
    for (provider, model), u in per_model.items():
        rows.append({
            "run_id": run_id, "model": model, "provider": provider, **{k: getattr(u, k) for k in COUNTERS},
            "errors": sum(u.errors.values()), "errors_by_type": sorted(u.errors.items()),
            "latency_p50_ms": u.latency_p50_ms, "latency_p95_ms": u.latency_p95_ms,
            "latency_p99_ms": u.latency_p99_ms, "wall_seconds": u.wall_seconds,
            "requests_per_minute": u.requests_per_minute, "tokens_per_minute": u.tokens_per_minute,
            "gone": u.gone,
        })
    return rows


def append_stats(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Add this run's rows to stats.parquet (earlier runs are kept), atomically."""
    path = out_dir / STATS_FILE
    table = pa.Table.from_pylist(rows, schema=STATS_SCHEMA)
    if path.exists():
        try:
            old = pq.read_table(path)
            for name in STATS_SCHEMA.names:  # a column added by a later version: zero for older runs
                if name not in old.column_names:
                    typ = STATS_SCHEMA.field(name).type
                    fill = pa.nulls(old.num_rows, typ) if pa.types.is_string(typ) else pa.array([0] * old.num_rows, typ)
                    old = old.append_column(name, fill)
            old = old.select(STATS_SCHEMA.names).cast(STATS_SCHEMA)
            table = pa.concat_tables([old, table])
        except (pa.ArrowException, OSError):
            pass  # an unreadable old file is replaced by this run's figures
    with replacing(path) as tmp:
        pq.write_table(table, tmp)


def previous_cost(out_dir: Path) -> float:
    """What earlier runs of this output spent (including billed failures), from stats.parquet."""
    path = out_dir / STATS_FILE
    if not path.exists():
        return 0.0
    try:
        return float(sum(pq.read_table(path, columns=["cost_usd"])["cost_usd"].to_pylist()))
    except (pa.ArrowException, OSError):
        return 0.0


def recorded_runs(out_dir: Path) -> set[str]:
    """The run ids stats.parquet has rows for."""
    path = out_dir / STATS_FILE
    if not path.exists():
        return set()
    try:
        return {str(r) for r in pq.read_table(path, columns=["run_id"])["run_id"].to_pylist()}
    except (pa.ArrowException, OSError):
        return set()


def recorded_ok(out_dir: Path) -> dict[tuple[str, str], int]:
    """Answers stats.parquet counts, per (provider, model) over all its runs."""
    path = out_dir / STATS_FILE
    if not path.exists():
        return {}
    try:
        table = pq.read_table(path, columns=["provider", "model", "ok"])
    except (pa.ArrowException, OSError):
        return {}
    ok: dict[tuple[str, str], int] = {}
    for provider, model, n in zip(*(table[c].to_pylist() for c in table.column_names)):
        ok[(provider, model)] = ok.get((provider, model), 0) + (n or 0)
    return ok
