"""Report, stage 2: what an output directory holds -> the numbers behind every chart and table.

Takes ``OutputFiles`` (report_read) and gives one JSON-ready dict, the
``report-data`` embedded in the page (layout in README "Run report"). Every
figure is aggregated here, with numpy over integer codes, so that drawing
(report_charts) only ever sees a few hundred points per series whatever
the number of attempts.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import numpy as np

from batch.report_columns import Attempts, Bools, Category, Floats, Results
from batch.report_read import STATS_COUNTS, OutputFiles
from batch.report_timeline import timeline

DATA_VERSION = 1
EXAMPLE_IDS = 5  # example row ids per error type
MAX_ERROR_TYPES = 40  # an open vocabulary: keep the table readable if it explodes
LATENCY_BINS_PER_DECADE = 10


def build_data(files: OutputFiles, *, now: datetime | None = None) -> dict[str, Any]:
    """All the report's numbers, from files read at one moment."""
    now = now or datetime.now(timezone.utc)
    results = Results.of(files.results)
    attempts = Attempts.of(files.attempts) if files.attempts is not None else None
    runs = _runs(files, now)
    data: dict[str, Any] = {
        "version": DATA_VERSION,
        "output": str(files.out_dir),
        "generated": now.isoformat(timespec="seconds"),
        "has_attempt_log": attempts is not None,
        "notes": list(files.notes),
        "summary": _summary(files, results, runs),
        "models": _models(files.stats),
        "runs": runs,
        "rows": _rows(results),
        "errors": {"rows": error_table(results.error_type, results.message, results.ids,
                                       results.status.mask("error"))},
        "latency": _latency(attempts, results),
    }
    if attempts is not None:
        data["attempts"] = attempt_totals(attempts)
        data["errors"]["attempts"] = error_table(attempts.outcome, attempts.message, attempts.ids,
                                                 attempts.failed | attempts.outcome.mask("rate_limited"))
        data["timeline"] = timeline(attempts, runs)
    return data


def _runs(files: OutputFiles, now: datetime) -> list[dict[str, Any]]:
    """One entry per run: the manifest's history, then runs only stats or the attempt log know of."""
    listed = [r for r in (files.manifest or {}).get("runs", []) if isinstance(r, dict)]
    known = {str(r.get("run_id")) for r in listed}
    extra = sorted({s["run_id"] for s in files.stats} - known)
    if files.attempts is not None and files.attempts.num_rows:
        seen = files.attempts["run_id"].cast("string").unique().to_pylist()
        extra = sorted(set(extra) | {str(r) for r in seen if r is not None} - known)
    runs = []
    for entry in [*listed, *({"run_id": r} for r in extra)]:
        run_id = str(entry.get("run_id"))
        per_model = [s for s in files.stats if s["run_id"] == run_id]
        runs.append({
            "run_id": run_id, "started": entry.get("started"), "ended": entry.get("ended"),
            "outcome": entry.get("outcome"), "stop_reason": entry.get("stop_reason"),
            "rows_this_run": entry.get("rows_this_run"), "rows_ok": entry.get("rows_ok"),
            "rows_error": entry.get("rows_error"), "exit_code": entry.get("exit_code"),
            "max_cost_usd": entry.get("max_cost_usd"), "limits": _limits(entry.get("limits")),
            "wall_seconds": _wall(entry, per_model, now),
            "requests": sum(s["requests"] for s in per_model),
            "cost_usd": sum(s["cost_usd"] for s in per_model),
            "models": [{k: s[k] for k in ("key", *STATS_COUNTS, "cost_usd")} for s in per_model],
        })
    return runs


def _limits(raw: object) -> dict[str, dict[str, int | None]]:
    if not isinstance(raw, dict):
        return {}
    return {str(k): {"requests_per_minute": v.get("requests_per_minute"),
                     "tokens_per_minute": v.get("tokens_per_minute")}
            for k, v in raw.items() if isinstance(v, dict)}


def _wall(entry: dict[str, Any], per_model: list[dict[str, Any]], now: datetime) -> float | None:
    """The run's duration: from the manifest's times (a running run: until now), else stats."""
    started, ended = parse_time(entry.get("started")), parse_time(entry.get("ended"))
    if started is not None and (ended is not None or entry.get("outcome") == "running"):
        return max(0.0, ((ended or now) - started).total_seconds())
    walls = [s["wall_seconds"] for s in per_model]
    return max(walls) if walls else None


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _summary(files: OutputFiles, results: Results, runs: list[dict[str, Any]]) -> dict[str, Any]:
    status = results.status.count()
    stats = files.stats
    walls = [r["wall_seconds"] for r in runs if r["wall_seconds"] is not None]
    return {
        "rows": results.n, "ok": status.get("ok", 0), "error": status.get("error", 0),
        "requests": sum(s["requests"] for s in stats),
        "prompt_tokens": sum(s["prompt_tokens"] for s in stats),
        "completion_tokens": sum(s["completion_tokens"] for s in stats),
        "cost_usd": sum(s["cost_usd"] for s in stats),
        "row_cost_usd": float(results.cost_usd.sum()),
        "cache_hits": sum(s["cache_hits"] for s in stats),
        "wall_seconds": sum(walls) if walls else None,
        "runs": len(runs),
    }


def _models(stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """stats.parquet added up per model over all runs (percentiles do not add: see ``latency``)."""
    models: dict[str, dict[str, Any]] = {}
    for s in stats:
        m = models.setdefault(s["key"], {"key": s["key"], **dict.fromkeys(STATS_COUNTS, 0), "cost_usd": 0.0,
                                         "errors_by_type": {}})
        for k in (*STATS_COUNTS, "cost_usd"):
            m[k] += s[k]
        for kind, n in s["errors_by_type"].items():
            m["errors_by_type"][kind] = m["errors_by_type"].get(kind, 0) + int(n or 0)
    return sorted(models.values(), key=lambda m: m["key"])


def _rows(results: Results) -> dict[str, Any]:
    """Rows by status, by lane (and status within each lane), from cache, per answering model."""
    by_lane: dict[str, dict[str, int]] = {}
    for code, lane in enumerate(results.lane.labels):
        here = results.lane.codes == code
        if here.any():
            by_lane[lane or "online"] = results.status.count(here)
    return {
        "by_status": results.status.count(), "by_lane": by_lane, "cached": int(results.cached.sum()),
        "ok_by_model": results.model.count(results.status.mask("ok")),
        "cost_usd": float(results.cost_usd.sum()),
    }


def attempt_totals(a: Attempts) -> dict[str, Any]:
    """What the attempt log adds up to: requests, 429s, errors, fallbacks, cost, lanes, cache hits."""
    online = a.lane.mask("online")
    limited = a.outcome.mask("rate_limited")
    fallback = a.then.mask("fallback")
    arrived = a.arrivals_down_chain
    return {
        "attempts": a.n, "by_lane": a.lane.count(), "cache_hits": a.lane.count().get("cache", 0),
        "requests": int(online.sum()), "requests_by_model": a.model.count(online),
        "rate_limited": int(limited.sum()), "rate_limited_by_model": a.model.count(limited),
        "errors": int(a.failed.sum()), "errors_by_type": a.outcome.count(a.failed),
        "errors_by_model": a.model.count(a.failed),
        "fallbacks": int(arrived.sum()), "fallbacks_from_model": a.model.count(fallback),
        "fallbacks_in_by_model": a.model.count(arrived),
        "repairs": int(a.then.mask("repair").sum()),
        "rows_finished": a.then.count(a.then.mask("done", "failed")),
        "cost_usd": float(a.cost_usd.sum()), "cost_by_model": a.model.sum(a.cost_usd),
        "prompt_tokens": int(a.prompt_tokens.sum()), "completion_tokens": int(a.completion_tokens.sum()),
        "then": a.then.count(),
    }


def error_table(kind: Category, message: Category, ids: Any, where: Bools) -> list[dict[str, Any]]:
    """Per error type: count, one example message, up to EXAMPLE_IDS example row ids; most frequent first."""
    codes = kind.codes[where]
    counts = np.bincount(codes, minlength=len(kind.labels))
    order = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c]][:MAX_ERROR_TYPES]
    rows = []
    positions = np.flatnonzero(where)
    for code in order:
        typed = positions[codes == code]
        with_message = typed[message.codes[typed] != len(message.labels) - 1]
        example = message.labels[int(message.codes[with_message[0]])] if len(with_message) else None
        rows.append({"type": kind.labels[code] or "(none)", "count": int(counts[code]), "example_message": example,
                     "example_ids": _first_distinct(ids.take(typed[:EXAMPLE_IDS * 10]).to_pylist())})
    return rows


def _first_distinct(values: list[Any]) -> list[str]:
    """Up to EXAMPLE_IDS distinct ids, in order (a row retried five times is one example, not five)."""
    return list(dict.fromkeys(str(v) for v in values))[:EXAMPLE_IDS]


def _latency(attempts: Attempts | None, results: Results) -> dict[str, Any]:
    """Latency of accepted answers per model: percentiles and a log-binned histogram."""
    if attempts is not None:
        source, model, values = "attempts", attempts.model, attempts.latency_ms
        where = attempts.outcome.mask("ok") & ~attempts.lane.mask("cache")
    else:
        source, model, values = "results", results.model, results.latency_ms
        where = results.status.mask("ok") & ~results.cached
    where = where & ~np.isnan(values)
    edges = latency_edges(values[where])
    per_model = {}
    for code, label in enumerate(model.labels):
        x = values[where & (model.codes == code)]
        if len(x):
            per_model[label or "?"] = {"count": int(len(x)), **percentiles(x),
                                       "counts": np.histogram(x, bins=edges)[0].tolist()}
    return {"source": source, "edges_ms": edges.tolist(), "models": per_model}


def latency_edges(values: Floats) -> Floats:
    """Log-spaced bin edges covering ``values`` (latency spans decades: 20 ms to 60 s)."""
    if not len(values):
        return np.array([1.0, 10.0])
    low = math.floor(math.log10(max(float(values.min()), 0.1)))
    high = max(math.ceil(math.log10(max(float(values.max()), 0.1))), low + 1)
    edges = np.logspace(low, high, (high - low) * LATENCY_BINS_PER_DECADE + 1)
    edges[0] = min(edges[0], float(values.min()))  # 0 ms and below-0.1 ms values fall in the first bin
    return edges


def percentiles(values: Floats) -> dict[str, float]:
    """p50, p95, p99 by nearest rank, as stats.parquet computes them; and the maximum."""
    ordered = np.sort(values)
    n = len(ordered)
    out = {f"p{p}_ms": round(float(ordered[max(0, math.ceil(p / 100 * n) - 1)]), 3) for p in (50, 95, 99)}
    out["max_ms"] = round(float(ordered[-1]), 3)
    return out
