"""Stage 8: what each model did -> ``stats.parquet`` rows and the run summary.

The router counts into one ``ModelStats`` per model (plain attribute
increments: this is the hot path). At the end each becomes an immutable
``Usage`` value; ``Usage`` values add, so totals are ``sum(usages, Usage())``.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batch.atomic import replacing

STATS_FILE = "stats.parquet"


class ModelStats:
    """Mutable counters for one model during one run."""

    __slots__ = ("label", "requests", "ok", "errors", "retries", "rate_limited", "fallbacks_in",
                 "prompt_tokens", "completion_tokens", "cost_usd", "charged_failures", "latencies", "cache_hits",
                 "repairs", "invalid_outputs")

    def __init__(self, label: str) -> None:
        self.label = label
        self.requests = 0
        self.ok = 0
        self.errors: Counter[str] = Counter()  # by error_type, per failed attempt
        self.retries = 0
        self.rate_limited = 0
        self.fallbacks_in = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost_usd = 0.0
        self.charged_failures = 0
        self.latencies = array("d")  # 8 bytes per answered request
        self.cache_hits = 0  # rows answered from the response cache (not requests: nothing was sent)
        self.repairs = 0  # requests that asked again after an invalid answer ([output_format])
        self.invalid_outputs = 0  # answers that failed the output_format check

    def freeze(self, wall_seconds: float) -> Usage:
        lat = sorted(self.latencies)
        return Usage(
            requests=self.requests, ok=self.ok, errors=dict(self.errors), retries=self.retries,
            rate_limited=self.rate_limited, fallbacks_in=self.fallbacks_in,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            cost_usd=self.cost_usd, charged_failures=self.charged_failures, cache_hits=self.cache_hits,
            repairs=self.repairs, invalid_outputs=self.invalid_outputs,
            latency_p50_ms=_pct(lat, 50), latency_p95_ms=_pct(lat, 95), latency_p99_ms=_pct(lat, 99),
            wall_seconds=wall_seconds,
        )


def _pct(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)  # nearest-rank
    return round(sorted_values[k], 3)


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """What one model (or a total) did; values add."""

    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    rate_limited: int = 0
    fallbacks_in: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    charged_failures: int = 0
    cache_hits: int = 0
    repairs: int = 0
    invalid_outputs: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    wall_seconds: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        errors = Counter(self.errors)
        errors.update(other.errors)
        return Usage(
            requests=self.requests + other.requests, ok=self.ok + other.ok, errors=dict(errors),
            retries=self.retries + other.retries, rate_limited=self.rate_limited + other.rate_limited,
            fallbacks_in=self.fallbacks_in + other.fallbacks_in,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cost_usd=self.cost_usd + other.cost_usd, charged_failures=self.charged_failures + other.charged_failures,
            cache_hits=self.cache_hits + other.cache_hits, repairs=self.repairs + other.repairs,
            invalid_outputs=self.invalid_outputs + other.invalid_outputs,
            wall_seconds=max(self.wall_seconds, other.wall_seconds),
        )

    @property
    def requests_per_minute(self) -> float:
        return self.requests * 60 / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def tokens_per_minute(self) -> float:
        tokens = self.prompt_tokens + self.completion_tokens
        return tokens * 60 / self.wall_seconds if self.wall_seconds else 0.0


STATS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("model", pa.string()), ("provider", pa.string()),
    ("requests", pa.int64()), ("ok", pa.int64()), ("errors", pa.int64()),
    ("errors_by_type", pa.map_(pa.string(), pa.int64())),
    ("retries", pa.int64()), ("rate_limited", pa.int64()), ("fallbacks_in", pa.int64()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("cost_usd", pa.float64()),
    ("charged_failures", pa.int64()),
    ("latency_p50_ms", pa.float64()), ("latency_p95_ms", pa.float64()), ("latency_p99_ms", pa.float64()),
    ("wall_seconds", pa.float64()), ("requests_per_minute", pa.float64()), ("tokens_per_minute", pa.float64()),
    ("cache_hits", pa.int64()), ("repairs", pa.int64()), ("invalid_outputs", pa.int64()),
])


def stats_rows(run_id: str, per_model: dict[tuple[str, str], Usage]) -> list[dict[str, Any]]:
    rows = []
    for (provider, model), u in per_model.items():
        rows.append({
            "run_id": run_id, "model": model, "provider": provider,
            "requests": u.requests, "ok": u.ok, "errors": sum(u.errors.values()),
            "errors_by_type": sorted(u.errors.items()),
            "retries": u.retries, "rate_limited": u.rate_limited, "fallbacks_in": u.fallbacks_in,
            "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "cost_usd": u.cost_usd, "charged_failures": u.charged_failures,
            "latency_p50_ms": u.latency_p50_ms, "latency_p95_ms": u.latency_p95_ms,
            "latency_p99_ms": u.latency_p99_ms, "wall_seconds": u.wall_seconds,
            "requests_per_minute": u.requests_per_minute, "tokens_per_minute": u.tokens_per_minute,
            "cache_hits": u.cache_hits, "repairs": u.repairs, "invalid_outputs": u.invalid_outputs,
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
                    old = old.append_column(name, pa.array([0] * old.num_rows, STATS_SCHEMA.field(name).type))
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
