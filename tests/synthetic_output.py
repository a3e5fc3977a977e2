"""A synthetic output directory for the report's tests: results, stats.parquet, manifest.json and attempts/.

Each row is told as a story of attempts (model, outcome); from the same story
this writes the attempt log exactly in the specified schema (``ATTEMPT_SCHEMA``,
kept here rather than imported from batch, so that the tests pin the
contract), the row's result, and stats.parquet counted the way the router
counts (requests = HTTP attempts, 429s apart from errors, fallbacks_in per
model entered down the chain, billed failures in the cost).

    out = SyntheticOutput(tmp_path / "out", [("openrouter", "a"), ("openrouter", "b")])
    out.start_run("run-1", datetime(2026, 12, 1, 2, tzinfo=timezone.utc), max_cost_usd=1.0)
    out.row("r1", [(0, "rate_limited"), (0, "ok")])
    out.end_run()
    out.write()
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batch.sinks import result_schema
from batch.stats import STATS_SCHEMA

ATTEMPT_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("id", pa.string()), ("attempt", pa.int32()), ("lane", pa.string()),
    ("provider", pa.string()), ("model", pa.string()), ("level", pa.int32()),
    ("started", pa.timestamp("us", tz="UTC")), ("latency_ms", pa.float64()), ("status", pa.int32()),
    ("outcome", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("cost_usd", pa.float64()), ("then", pa.string()), ("error_message", pa.string()),
])
STATUS = {"ok": 200, "invalid_output": 200, "rate_limited": 429, "server_error": 500, "upstream_error": 200,
          "bad_request": 400, "context_length": 400, "model_not_found": 404, "timeout": None, "connection": None,
          "batch_expired": None}
BILLED = {"ok", "invalid_output"}
Step = tuple[int, str]  # (place in the chain, outcome)


@dataclass
class _Run:
    run_id: str
    clock: datetime
    entry: dict[str, Any]
    stats: dict[int, Counter[str]] = field(default_factory=dict)
    errors: dict[int, Counter[str]] = field(default_factory=dict)
    latencies: dict[int, list[float]] = field(default_factory=dict)


class SyntheticOutput:
    """Builds an output directory run by run, row by row; ``write()`` puts it on disk."""

    def __init__(self, out: Path, chain: list[tuple[str, str]], *, lane_column: bool = True) -> None:
        self.out = out
        self.chain = chain
        self.lane_column = lane_column
        self.attempts: list[dict[str, Any]] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.runs: list[_Run] = []
        self.stats_rows: list[dict[str, Any]] = []

    def start_run(self, run_id: str, started: datetime, *, max_cost_usd: float | None = None,
                  limits: dict[str, int | None] | None = None) -> None:
        entry: dict[str, Any] = {"run_id": run_id, "started": started.isoformat(), "ended": None,
                                 "outcome": "running", "max_cost_usd": max_cost_usd}
        if limits is not None:
            entry["limits"] = {k: {"requests_per_minute": v, "tokens_per_minute": None} for k, v in limits.items()}
        self.runs.append(_Run(run_id, started, entry))

    def row(self, rid: str, steps: list[Step], *, lane: str = "online", stopped: bool = False,
            gap_seconds: float = 0.5, latency_ms: float = 300.0) -> None:
        """One row's attempts in the current run; the last step ends it (ok, failed, or stopped)."""
        run = self.runs[-1]
        run.clock += timedelta(seconds=gap_seconds)
        sent = 0
        cost = 0.0
        for i, (level, outcome) in enumerate(steps):
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            then = self._then(outcome, level, nxt, stopped)
            step_lane = "online" if lane == "batch" and i > 0 and steps[i - 1][1] == "batch_expired" else lane
            a = self._attempt(run, rid, i + 1, step_lane, level, outcome, then, latency_ms * (1 + i))
            sent += 1
            cost += a["cost_usd"] or 0.0
            if i == 0 or level != steps[i - 1][0]:
                if level > 0:
                    run.stats[level]["fallbacks_in"] += 1
        if stopped:
            return
        self._result(rid, steps[-1], sent, cost, lane)

    def cache_hit(self, rid: str, level: int = 0) -> None:
        """A row answered from the response cache: attempt 0, lane cache, nothing billed."""
        run = self.runs[-1]
        run.clock += timedelta(seconds=0.01)
        self._attempt(run, rid, 0, "cache", level, "ok", "done", None)
        provider, model = self.chain[level]
        self.results[rid] = self._result_row(rid, "ok", provider, model, level, 0, 12, 3, 0.0, "cache", None,
                                             None, None, True, "online")

    def end_run(self, outcome: str = "completed", stop_reason: str | None = None) -> None:
        run = self.runs[-1]
        ok = sum(r["status"] == "ok" for r in self.results.values())
        run.entry.update(ended=(run.clock + timedelta(seconds=1)).isoformat(), outcome=outcome,
                         stop_reason=stop_reason, rows_ok=ok, rows_error=len(self.results) - ok,
                         exit_code=3 if outcome == "stopped" else 1 if len(self.results) > ok else 0)
        wall = (run.clock - datetime.fromisoformat(run.entry["started"])).total_seconds() + 1
        for level in sorted(set(run.stats) | set(run.errors)):
            self.stats_rows.append(self._stats_row(run, level, wall))

    def _then(self, outcome: str, level: int, nxt: Step | None, stopped: bool) -> str:
        if outcome == "ok":
            return "done"
        if nxt is None:
            return "stopped" if stopped else "failed"
        if nxt[0] != level:
            return "fallback"
        return {"rate_limited": "wait", "invalid_output": "repair"}.get(outcome, "retry")

    def _attempt(self, run: _Run, rid: str, number: int, lane: str, level: int, outcome: str, then: str,
                 latency: float | None) -> dict[str, Any]:
        provider, model = self.chain[level]
        billed = outcome in BILLED and lane != "cache" or outcome == "upstream_error"
        a = {"run_id": run.run_id, "id": rid, "attempt": number, "lane": lane, "provider": provider,
             "model": model, "level": level, "started": run.clock, "latency_ms": latency,
             "status": None if lane == "cache" else STATUS.get(outcome, 500), "outcome": outcome,
             "prompt_tokens": 12 if billed or lane == "cache" else None,
             "completion_tokens": (3 if outcome != "upstream_error" else 1) if billed or lane == "cache" else None,
             "cost_usd": (0.001 if outcome != "upstream_error" else 0.0002) if billed else None,
             "then": then, "error_message": None if outcome == "ok" else f"{outcome}: <b>HTTP</b> said no to {rid}"}
        self.attempts.append(a)
        run.clock += timedelta(milliseconds=(latency or 0) + 50)
        self._count(run, a)
        return a

    def _count(self, run: _Run, a: dict[str, Any]) -> None:
        """The router's counters for one attempt (stats.parquet is their sum per run and model)."""
        s = run.stats.setdefault(a["level"], Counter())
        run.errors.setdefault(a["level"], Counter())
        outcome, then = a["outcome"], a["then"]
        if a["lane"] == "cache":
            s["cache_hits"] += 1
            return
        if a["lane"] == "online":
            s["requests"] += 1
        if outcome == "ok":
            s["ok"] += 1
            run.latencies.setdefault(a["level"], []).append(a["latency_ms"])
        elif outcome == "rate_limited":
            s["rate_limited"] += 1
            if then in ("failed", "fallback"):  # out of waits: the router counts it as an error too
                run.errors[a["level"]][outcome] += 1
        else:
            if then != "repair":  # a repaired answer is counted as invalid_outputs and repairs, not an error
                run.errors[a["level"]][outcome] += 1
            s["invalid_outputs"] += outcome == "invalid_output"
            if a["cost_usd"]:
                s["charged_failures"] += 1
        s["retries"] += then == "retry"
        s["repairs"] += then == "repair"
        if a["prompt_tokens"] is not None and outcome in ("ok", "invalid_output"):
            s["prompt_tokens"] += a["prompt_tokens"]
            s["completion_tokens"] += a["completion_tokens"]
        s["cost_micro"] += round((a["cost_usd"] or 0.0) * 1e9)

    def _stats_row(self, run: _Run, level: int, wall: float) -> dict[str, Any]:
        s, errors = run.stats.get(level, Counter()), run.errors.get(level, Counter())
        lat = sorted(run.latencies.get(level, []))
        pct = {p: lat[max(0, -(-p * len(lat) // 100) - 1)] if lat else None for p in (50, 95, 99)}
        provider, model = self.chain[level]
        return {"run_id": run.run_id, "model": model, "provider": provider, "requests": s["requests"],
                "ok": s["ok"], "errors": sum(errors.values()), "errors_by_type": sorted(errors.items()),
                "retries": s["retries"], "rate_limited": s["rate_limited"], "fallbacks_in": s["fallbacks_in"],
                "prompt_tokens": s["prompt_tokens"], "completion_tokens": s["completion_tokens"],
                "cost_usd": s["cost_micro"] / 1e9, "charged_failures": s["charged_failures"],
                "latency_p50_ms": pct[50], "latency_p95_ms": pct[95], "latency_p99_ms": pct[99],
                "wall_seconds": wall, "requests_per_minute": s["requests"] * 60 / wall, "tokens_per_minute": 0.0,
                "cache_hits": s["cache_hits"], "repairs": s["repairs"], "invalid_outputs": s["invalid_outputs"]}

    def _result(self, rid: str, last: Step, sent: int, cost: float, lane: str) -> None:
        level, outcome = last
        provider, model = self.chain[level]
        final = self.attempts[-1]
        if outcome == "ok":
            row = self._result_row(rid, "ok", provider, model, level, sent, final["prompt_tokens"],
                                   final["completion_tokens"], cost, "provider", final["latency_ms"], None, None,
                                   False, lane)
        else:
            row = self._result_row(rid, "error", None, model, level, sent, None, None, cost or None,
                                   "provider" if cost else None, None, outcome, final["error_message"], False, lane)
        self.results[rid] = row

    def _result_row(self, rid: str, status: str, provider: str | None, model: str, level: int, attempts: int,
                    prompt: int | None, completion: int | None, cost: float | None, source: str | None,
                    latency: float | None, error_type: str | None, message: str | None, cached: bool,
                    lane: str) -> dict[str, Any]:
        return {"id": rid, "status": status, "output": "positive" if status == "ok" else None,
                "finish_reason": "stop" if status == "ok" else None, "model": model, "provider": provider,
                "fallback_level": level, "attempts": attempts, "prompt_tokens": prompt,
                "completion_tokens": completion, "cached_tokens": None, "reasoning_tokens": None,
                "cost_usd": cost, "cost_source": source, "latency_ms": latency, "error_type": error_type,
                "error_message": message, "request_hash": f"h{rid}", "cached": cached, "lane": lane}

    def write(self, parts: int = 3) -> Path:
        """Results, attempts (in ``parts`` parts, plus a hidden temporary file), stats and manifest."""
        for sub, rows, schema in (("attempts", self.attempts, ATTEMPT_SCHEMA),
                                  ("results", list(self.results.values()), self._results_schema())):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
            table = pa.Table.from_pylist(rows, schema=schema)
            size = max(1, -(-table.num_rows // parts))
            for i in range(parts):
                pq.write_table(table.slice(i * size, size), self.out / sub / f"part-{i + 1:05d}.parquet")
            (self.out / sub / ".part-99999.parquet.tmp").write_bytes(b"half-written")  # readers skip it
        pq.write_table(pa.Table.from_pylist(self.stats_rows, schema=STATS_SCHEMA), self.out / "stats.parquet")
        manifest = {"fingerprint": {"input": "synthetic"}, "runs": [r.entry for r in self.runs]}
        (self.out / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        return self.out

    def _results_schema(self) -> pa.Schema:
        schema = result_schema([])  # has a lane column, as outputs of batch 0.2 on do
        return schema if self.lane_column else schema.remove(schema.get_field_index("lane"))


CHAIN = [("openrouter", "openai/gpt-4o-mini"), ("openrouter", "mistralai/mistral-small")]
PRIMARY, FALLBACK = (f"{p}:{m}" for p, m in CHAIN)


def faulty_output(out: Path, *, lane_column: bool = True, parts: int = 3) -> SyntheticOutput:
    """Two runs over 50 rows: 429s, 5xx and timeouts, a fallback, a repair, cache hits, batch lines, an error row.

    Run 1 (02:00 UTC) is stopped by its budget with two rows in flight; run 2
    (09:00 UTC) resumes them, sends ten rows as provider-batch lines, and sees
    the primary fail for five rows in a row, which fall back.
    """
    o = SyntheticOutput(out, CHAIN, lane_column=lane_column)
    t0 = datetime.fromisoformat("2026-12-01T02:00:00+00:00")
    o.start_run("20261201T020000Z-aaaaaa", t0, max_cost_usd=0.05, limits={PRIMARY: 120, FALLBACK: 60})
    for i in range(20):
        o.row(f"r{i:02d}", [(0, "ok")], latency_ms=200.0 + 10 * i)
    o.row("r20", [(0, "rate_limited"), (0, "rate_limited"), (0, "ok")])
    o.row("r21", [(0, "rate_limited"), (0, "ok")])
    o.row("r22", [(0, "server_error"), (0, "ok")])
    o.row("r23", [(0, "timeout"), (0, "timeout"), (0, "timeout"), (1, "ok")])
    o.row("r24", [(0, "invalid_output"), (0, "ok")])
    o.row("r25", [(0, "bad_request"), (1, "context_length")])
    o.cache_hit("r26", level=0)
    o.cache_hit("r27", level=1)
    o.row("r28", [(0, "rate_limited")], stopped=True)
    o.row("r29", [(0, "ok")], stopped=True)  # answered, but the run stopped before the row was written
    o.end_run("stopped", "budget reached: max_cost_usd $0.05 would be passed by the next request")
    o.start_run("20261201T090000Z-bbbbbb", t0 + timedelta(hours=7), max_cost_usd=0.1,
                limits={PRIMARY: 120, FALLBACK: 60})
    o.row("r28", [(0, "ok")])
    o.row("r29", [(0, "ok")])
    for i in range(30, 39):
        o.row(f"r{i}", [(0, "ok")], lane="batch", gap_seconds=0.01)
    o.row("r39", [(0, "batch_expired"), (1, "ok")], lane="batch")
    for i in range(40, 45):
        o.row(f"r{i}", [(0, "server_error")] * 3 + [(1, "ok")], gap_seconds=2.0)
    o.row("r45", [(0, "upstream_error"), (0, "ok")])
    for i in range(46, 50):
        o.row(f"r{i}", [(0, "ok")], latency_ms=900.0)
    o.end_run("completed")
    o.write(parts)
    return o
