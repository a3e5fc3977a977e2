"""Report, stage 2b: the attempt log -> counts per time bucket, one timeline per run.

Runs of one output can be days apart (a resume the next morning), so each
run gets its own time axis rather than one axis with a long empty gap. The
bucket width is one "nice" width (1 s ... 1 day) for all runs, chosen so the
longest run has at most ``MAX_BUCKETS`` buckets: a 2-minute test and a
10-hour night both draw a few hundred points per series. Counting is one
``np.bincount`` per series over ``code * buckets + bucket``.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import numpy as np

from batch.report_columns import Attempts, Bools, Category, Ints

NICE_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
MAX_BUCKETS = 300
MAX_RUNS_DRAWN = 6  # the latest runs; older ones stay in the tables
US = 1_000_000


def bucket_seconds(span_seconds: float) -> int:
    """The narrowest nice bucket that covers ``span_seconds`` in at most MAX_BUCKETS buckets."""
    for width in NICE_BUCKETS:
        if span_seconds / width <= MAX_BUCKETS:
            return width
    return NICE_BUCKETS[-1] * math.ceil(span_seconds / (NICE_BUCKETS[-1] * MAX_BUCKETS))


def timeline(a: Attempts, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per run: rows finished, requests, 429s, errors, fallbacks and cost per bucket."""
    spans: dict[int, tuple[int, int]] = {}
    for code in range(len(a.run.labels)):
        here = a.timed & (a.run.codes == code)
        if here.any():
            times = a.started_us[here]
            spans[code] = (int(times.min()), int(times.max()))
    width = bucket_seconds(max(((hi - lo) / US for lo, hi in spans.values()), default=0.0) + 1)
    order = {r["run_id"]: i for i, r in enumerate(runs)}
    drawn = sorted(spans, key=lambda c: (order.get(a.run.labels[c] or "", len(order)), spans[c][0]))
    cost_of_run = {a.run.labels[c]: float(v) for c, v in
                   enumerate(np.bincount(a.run.codes, weights=a.cost_usd, minlength=len(a.run.labels)))}
    out, arrived = [], a.arrivals_down_chain  # once: it sorts every attempt
    for code in drawn[-MAX_RUNS_DRAWN:]:
        run_id = a.run.labels[code] or "(none)"
        entry = runs[order[run_id]] if run_id in order else {}
        before = _cost_before(runs, order.get(run_id, len(runs)), cost_of_run)
        out.append(_run_series(a, code, spans[code][0], width, entry, before, arrived))
    return {"bucket_seconds": width, "untimed_attempts": int((~a.timed).sum()),
            "runs_not_drawn": [a.run.labels[c] for c in drawn[:-MAX_RUNS_DRAWN]], "runs": out}


def _cost_before(runs: list[dict[str, Any]], index: int, cost_of_run: dict[str | None, float]) -> float:
    """What earlier runs spent: the budget covers the whole output, across resumes."""
    return sum(cost_of_run.get(r["run_id"], r.get("cost_usd") or 0.0) for r in runs[:index])


def _run_series(a: Attempts, code: int, first_us: int, width: int, entry: dict[str, Any],
                before: float, arrived: Bools) -> dict[str, Any]:
    start_us = first_us // (width * US) * (width * US)  # bucket edges on round clock times
    here = a.timed & (a.run.codes == code)
    index = np.zeros(a.n, np.int64)
    index[here] = (a.started_us[here] - start_us) // (width * US)
    buckets = int(index[here].max()) + 1
    finished = here & a.then.mask("done", "failed")
    limits = entry.get("limits") or {}
    return {
        "run_id": a.run.labels[code] or "(none)",
        "outcome": entry.get("outcome"),
        "start": datetime.fromtimestamp(start_us / US, timezone.utc).isoformat(),
        "buckets": buckets,
        "rows": _counts(index, finished, buckets),
        "requests": _by(a.model, index, here & a.lane.mask("online"), buckets),
        "rate_limited": _by(a.model, index, here & a.outcome.mask("rate_limited"), buckets),
        "errors": _by(a.model, index, here & a.failed, buckets),
        "errors_by_type": _by(a.outcome, index, here & a.failed, buckets),
        "fallbacks": _counts(index, here & arrived, buckets),
        "cache_hits": _counts(index, here & a.lane.mask("cache"), buckets),
        "cost_usd": [round(x, 10) for x in np.bincount(index[here], weights=a.cost_usd[here],
                                                       minlength=buckets).tolist()],
        "cost_before_usd": before,
        "max_cost_usd": entry.get("max_cost_usd"),
        "limits_rps": {k: v["requests_per_minute"] / 60 for k, v in limits.items()
                       if isinstance(v.get("requests_per_minute"), (int, float))},
    }


def _counts(index: Ints, where: Bools, buckets: int) -> list[int]:
    return np.bincount(index[where], minlength=buckets).tolist()  # type: ignore[no-any-return]


def _by(cat: Category, index: Ints, where: Bools, buckets: int) -> dict[str, list[int]]:
    """Counts per bucket for each value of ``cat`` that occurs (where ``where``)."""
    flat = np.bincount(cat.codes[where] * buckets + index[where], minlength=len(cat.labels) * buckets)
    grid = flat.reshape(len(cat.labels), buckets)
    return {(cat.labels[c] or "(none)"): grid[c].tolist() for c in range(len(cat.labels)) if grid[c].any()}
