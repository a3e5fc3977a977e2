"""`batch report` on a synthetic output with 1,000,000 attempts: wall time, peak RSS, HTML size.

    .venv/bin/python bench/report.py [--attempts 1000000] [--keep DIR]

The output is generated with numpy and pyarrow, no Python loop per row (a
few seconds): two runs over 8 hours (the first stopped by its budget), four
models, 3% cache hits and 5% provider-batch lines, background faults
(timeouts, 5xx, invalid answers, context overflows), a 429 burst on the
primary model every 40 minutes, and the second model failing for 20 minutes
at 03:00. Results, stats.parquet and the manifest are derived from the same
attempts, as the runner would write them. `batch report` then runs in its own
process; its peak RSS is that process's ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import PYTHON, ROOT

MODELS = ["openai/gpt-4o-mini", "mistralai/mistral-small", "meta-llama/llama-3.1-8b-instruct", "qwen/qwen-2.5-7b"]
SHARE = [0.6, 0.25, 0.1, 0.05]
RPM = [3000, 1500, 600, None]
T0 = np.datetime64("2026-12-01T00:00:00", "us")
HOURS = 8.0
RUN_SPLIT = 0.75  # run 1 covers the first 6 hours, run 2 (after a gap) the last 2
PART = 100_000
FAULTS = {"timeout": 0.005, "server_error": 0.01, "invalid_output": 0.003, "context_length": 0.001}


def attempts_table(n: int, rng: np.random.Generator) -> pa.Table:
    """n attempts with their times, models, lanes, outcomes, what followed, latency, tokens and cost."""
    seconds = np.sort(rng.uniform(0, HOURS * 3600, n))
    run = (seconds > HOURS * 3600 * RUN_SPLIT).astype(np.int8)
    seconds = seconds + run * 3600.0  # run 2 starts an hour after run 1 ended
    model = rng.choice(len(MODELS), n, p=SHARE)
    lane = rng.choice(3, n, p=[0.92, 0.03, 0.05])  # online, cache, batch
    outcome = _outcomes(seconds, model, lane, rng)
    then = np.select([outcome == 0, outcome == 1, outcome == 3], [0, 1, 2], default=3)  # done, wait, repair, retry
    fate = rng.random(n)
    then = np.where((then == 3) & (fate < 0.15), 4, then)  # fallback
    then = np.where((then == 3) & (fate > 0.97), 5, then)  # failed
    finished = (then == 0) | (then == 5)
    row = np.cumsum(finished[::-1])[::-1]  # an attempt belongs to the next row that finishes
    ok = outcome == 0
    latency = np.where(outcome == 1, 20.0, rng.lognormal(np.log(400 + 300 * model), 0.6))
    prompt = np.where(ok, rng.integers(50, 400, n), 0)
    completion = np.where(ok, rng.integers(1, 50, n), 0)
    cost = np.where(ok & (lane != 1), prompt * 0.15e-6 + completion * 0.6e-6, 0.0)
    names = ["ok", "rate_limited", "timeout", "invalid_output", "server_error", "context_length"]
    message = pa.array(np.array(["", "429 Too Many Requests", "timed out after 60 s", "not one of the labels",
                                 "HTTP 502 from upstream", "context length exceeded"])[outcome])
    return pa.table({
        "run_id": _pick(["20261201T000000Z-aaaaaa", "20261201T070000Z-bbbbbb"], run),
        "id": pc.binary_join_element_wise("row-", pc.cast(pa.array(row.max() - row), pa.string()), ""),
        "attempt": pa.array(rng.integers(1, 4, n).astype(np.int32)),
        "lane": _pick(["online", "cache", "batch"], lane),
        "provider": pa.array(["openrouter"] * n).dictionary_encode(),
        "model": _pick(MODELS, model), "level": pa.array((model > 0).astype(np.int32) * model.astype(np.int32)),
        "started": pa.array(T0 + (seconds * 1e6).astype("timedelta64[us]")).cast(pa.timestamp("us", tz="UTC")),
        "latency_ms": pa.array(latency), "status": pa.array(np.array([200, 429, 0, 200, 502, 400])[outcome],
                                                             mask=outcome == 2).cast(pa.int32()),
        "outcome": _pick(names, outcome), "prompt_tokens": pa.array(prompt, mask=~ok),
        "completion_tokens": pa.array(completion, mask=~ok), "cost_usd": pa.array(cost),
        "then": _pick(["done", "wait", "repair", "retry", "fallback", "failed"], then),
        "error_message": pc.if_else(pa.array(ok), pa.scalar(None, pa.string()), message),
    })


def _outcomes(seconds: npt.NDArray[np.float64], model: npt.NDArray[np.int64], lane: npt.NDArray[np.int64],
              rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """0 ok, 1 rate_limited, 2 timeout, 3 invalid_output, 4 server_error, 5 context_length."""
    u = rng.random(len(seconds))
    outcome = np.zeros(len(seconds), np.int64)
    edge = 0.0
    for code, p in zip((2, 3, 4, 5), FAULTS.values()):
        outcome[(u >= edge) & (u < edge + p)] = code
        edge += p
    burst = (seconds % 2400 < 180) & (model == 0)  # the primary bounces off its limit every 40 minutes
    outcome[burst & (rng.random(len(seconds)) < 0.5)] = 1
    down = (seconds > 3 * 3600) & (seconds < 3 * 3600 + 1200) & (model == 1)  # 03:00-03:20
    outcome[down & (rng.random(len(seconds)) < 0.8)] = 4
    outcome[lane == 1] = 0  # a cache hit is an answer
    return outcome


def _pick(labels: list[str], codes: npt.NDArray[np.int64] | npt.NDArray[np.int8]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(labels))


def write_output(out: Path, attempts: pa.Table) -> None:
    for sub in ("attempts", "results"):
        (out / sub).mkdir(parents=True)
    plain = attempts.cast(pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type)
                                     for f in attempts.schema]))
    for i in range(0, plain.num_rows, PART):
        pq.write_table(plain.slice(i, PART), out / "attempts" / f"part-{i // PART + 1:05d}.parquet",
                       compression="zstd")
    results = _results(plain)
    for i in range(0, results.num_rows, PART):
        pq.write_table(results.slice(i, PART), out / "results" / f"part-{i // PART + 1:05d}.parquet",
                       compression="zstd")
    pq.write_table(_stats(plain), out / "stats.parquet")
    runs = [{"run_id": rid, "started": start, "ended": end, "outcome": outcome, "stop_reason": reason,
             "max_cost_usd": cap, "limits": {f"openrouter:{m}": {"requests_per_minute": r, "tokens_per_minute": None}
                                             for m, r in zip(MODELS, RPM)}}
            for rid, start, end, outcome, reason, cap in (
                ("20261201T000000Z-aaaaaa", "2026-12-01T00:00:00+00:00", "2026-12-01T06:00:00+00:00", "stopped",
                 "budget reached", 60.0),
                ("20261201T070000Z-bbbbbb", "2026-12-01T07:00:00+00:00", "2026-12-01T09:00:00+00:00",
                 "completed", None, 120.0))]
    (out / "manifest.json").write_text(json.dumps({"fingerprint": {}, "runs": runs}, indent=2))


def _results(a: pa.Table) -> pa.Table:
    """The last attempt of each row (then done or failed) is its result."""
    last = a.filter(pc.is_in(a["then"], pa.array(["done", "failed"])))
    ok = pc.equal(last["then"], "done")
    return pa.table({
        "id": last["id"], "status": pc.if_else(ok, "ok", "error"), "model": last["model"],
        "provider": last["provider"], "fallback_level": last["level"], "attempts": last["attempt"],
        "prompt_tokens": last["prompt_tokens"], "completion_tokens": last["completion_tokens"],
        "cost_usd": last["cost_usd"], "cost_source": pc.if_else(ok, "provider", pa.scalar(None, pa.string())),
        "latency_ms": last["latency_ms"], "error_type": pc.if_else(ok, pa.scalar(None, pa.string()), last["outcome"]),
        "error_message": last["error_message"], "cached": pc.equal(last["lane"], "cache"),
        "lane": pc.if_else(pc.equal(last["lane"], "batch"), "batch", "online"),
    })


def _stats(a: pa.Table) -> pa.Table:
    """Per run and model, the counts stats.parquet has (the report reads what is there, zeros for the rest)."""
    online = pc.equal(a["lane"], "online")
    flags = {"requests": online, "rate_limited": pc.equal(a["outcome"], "rate_limited"),
             "ok": pc.and_(online, pc.equal(a["outcome"], "ok")), "cache_hits": pc.equal(a["lane"], "cache"),
             "errors": pc.invert(pc.is_in(a["outcome"], pa.array(["ok", "rate_limited"]))),
             "retries": pc.equal(a["then"], "retry"), "fallbacks_in": pc.equal(a["then"], "fallback")}
    t = a
    for name, flag in flags.items():
        t = t.append_column(name, flag.cast(pa.int64()))
    sums = [*flags, "cost_usd", "prompt_tokens", "completion_tokens"]
    g = t.group_by(["run_id", "provider", "model"]).aggregate([(c, "sum") for c in sums])
    return pa.table({"run_id": g["run_id"], "model": g["model"], "provider": g["provider"],
                     **{c: g[f"{c}_sum"] for c in sums}})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attempts", type=int, default=1_000_000)
    ap.add_argument("--keep", type=Path, help="write the output here and keep it (e.g. for a screenshot)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="batch-report-"))
    out = args.keep or tmp / "out"
    try:
        t = time.perf_counter()
        write_output(out, attempts_table(args.attempts, np.random.default_rng(7)))
        made = time.perf_counter() - t
        size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
        t = time.perf_counter()
        proc = subprocess.run([PYTHON, "-m", "batch", "report", str(out)], cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
        assert proc.returncode == 0, proc.stderr
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        html = (out / "report.html").stat().st_size
        print(f"generated {args.attempts:,} attempts in {made:.1f} s ({size / 1e6:.0f} MB of Parquet)")
        print(f"batch report: {wall:.1f} s wall, peak RSS {rss:.0f} MB, report.html {html / 1e3:.0f} kB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
