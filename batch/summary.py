"""The end-of-run summary, as text (``batch run``) and as a dict (``batch run --json``).

Every figure says its scope:

- **dataset**: the output after this run, counting what earlier runs wrote
  (input rows with a result, ok and error rows, rows left, error rows by type
  with one message each);
- **this run**: rows finished, requests, tokens, cost, time and rate;
- **per model** (this run): requests, and *failed attempts*, which are
  requests, not rows: a row whose first attempt failed may still be ok.

The progress display's last frame is ``Summary.frame()``: the same figures,
formatted by the same ``Frame`` methods, so the screen and the summary agree.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from batch.progress import money, plural
from batch.stats import by_lane

if TYPE_CHECKING:
    from batch.runner import Summary
    from batch.stats import Usage

EXAMPLE_CHARS = 160  # an error row's message in the summary: enough to say why, not a whole body


def format_summary(s: Summary) -> str:
    """The summary as ``batch run`` prints it."""
    u, f = s.usage, s.frame()
    per_k = f" (${u.cost_usd / s.rows_this_run * 1000:.4f} per 1,000 rows)" if s.rows_this_run else ""
    left = f"; {s.rows_left} left" if s.rows_left else ""
    lines = [
        f"output     {s.out_dir}",
        f"dataset    {f.rows} of {s.rows_input} input rows have a result: {s.rows_ok} ok, {s.rows_error} error{left}",
        f"this run   {plural(s.rows_this_run, 'row')}: {s.rows_this_run_ok} ok, {s.rows_this_run_error} error"
        + (f"; {s.rows_skipped} skipped, they have results (ok or error)" if s.rows_skipped else ""),
        f"           {plural(u.requests, 'request')}, {_tokens(u)}, {money(u.cost_usd)}{per_k}",
        f"           {s.wall_seconds:.1f}s, {f.rate:.1f} rows/s",
    ]
    if s.rows_error and s.rows_skipped:  # error rows stay as they are unless asked for
        kept = "is kept; --retry-errors redoes it" if s.rows_error == 1 else "are kept; --retry-errors redoes them"
        lines.append(f"           the dataset's {plural(s.rows_error, 'error row')} {kept}")
    lines.extend(_lane_lines(by_lane(s.per_model)))
    if s.cache_path is not None:
        lines.append(f"cache      {plural(s.cache_hits, 'row')} answered from the cache (no request, no cost), "
                     f"{s.cache_misses} not found; {s.cache_path}")
    models = [(f"{p}:{m}", x) for (p, m), x in s.per_model.items() if x.requests or x.errors]
    if models:
        lines.append("per model (this run):")
    for label, x in models:
        lines.extend(_model_lines(label, x))
    if s.error_rows:
        lines.append("error rows (dataset), by error_type, one message each:")
        width = max(len(kind) for kind in s.error_rows)
        for kind, (rows, example) in s.error_rows.items():
            lines.append(f"  {kind:<{width}}  {rows:>6}  {_short(example)}")
    return "\n".join(lines)


def _lane_lines(lanes: dict[str, Usage]) -> list[str]:
    """This run's answers, tokens and cost by lane (only when a batch lane was used)."""
    if not lanes:
        return []
    parts = [f"{lane}: {plural(u.ok, 'answer')}, {u.prompt_tokens} + {u.completion_tokens} tokens, {money(u.cost_usd)}"
             for lane, u in lanes.items()]
    lines = ["lanes      " + "; ".join(parts)]
    second = sum(u.second_answers for u in lanes.values())
    if second:
        lines.append(f"           {plural(second, 'batch line')} answered rows already answered online: billed, "
                     "counted in the cost above, not kept")
    return lines


def _model_lines(label: str, x: Usage) -> list[str]:
    latency = (f", latency p50 {x.latency_p50_ms:.1f} ms, p95 {x.latency_p95_ms:.1f} ms"
               if x.latency_p50_ms is not None and x.latency_p95_ms is not None else "")
    came = f", {plural(x.fallbacks_in, 'row')} from the model above" if x.fallbacks_in else ""
    checked = (f", invalid answers {x.invalid_outputs}, repairs {x.repairs}"
               if x.invalid_outputs or x.repairs else "")
    lines = [f"  {label}: {plural(x.requests, 'request')}, {x.ok} answered{came}{checked}, {money(x.cost_usd)}{latency}"]
    if x.errors or x.rate_limited:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(x.errors.items())) or "none"
        lines.append(f"    failed attempts (requests, not rows): {kinds}; retried on this model {x.retries}, "
                     f"429s waited out {x.rate_limited}")
    return lines


def _tokens(u: Usage) -> str:
    """Billed tokens (what the cost is for: answers, repairs, billed failures); the answers' own when fewer."""
    billed = f"{u.billed_prompt_tokens} prompt + {u.billed_completion_tokens} completion tokens billed"
    if (u.prompt_tokens, u.completion_tokens) == (u.billed_prompt_tokens, u.billed_completion_tokens):
        return billed
    return f"{billed} (answers: {u.prompt_tokens} + {u.completion_tokens})"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS - 3] + "..."


def summary_dict(s: Summary) -> dict[str, object]:
    """The summary as ``batch run --json`` prints it: ``dataset`` and ``this_run`` say their scope; the flat
    keys before them are kept for scripts written against earlier versions."""
    u, f = s.usage, s.frame()
    models = [{"provider": p, "model": m, **dataclasses.asdict(x)} for (p, m), x in s.per_model.items()]
    return {
        "output": str(s.out_dir), "exit_code": s.exit_code, "stop_reason": s.stop_reason,
        "rows": s.rows_total, "ok": s.rows_ok, "error": s.rows_error, "rows_this_run": s.rows_this_run,
        "rows_skipped": s.rows_skipped, "requests": u.requests, "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens, "billed_prompt_tokens": u.billed_prompt_tokens,
        "billed_completion_tokens": u.billed_completion_tokens, "cost_usd": round(u.cost_usd, 8),
        "cache_hits": s.cache_hits, "cache_misses": s.cache_misses,
        "cache_path": str(s.cache_path) if s.cache_path else None,
        "wall_seconds": round(s.wall_seconds, 3), "rows_per_second": round(f.rate, 1),
        "dataset": {
            "rows_input": s.rows_input, "rows_with_result": s.rows_total, "ok": s.rows_ok, "error": s.rows_error,
            "rows_left": s.rows_left,
            "error_rows_by_type": {k: {"rows": n, "example": msg} for k, (n, msg) in s.error_rows.items()},
        },
        "this_run": {
            "rows": s.rows_this_run, "ok": s.rows_this_run_ok, "error": s.rows_this_run_error,
            "skipped": s.rows_skipped, "requests": u.requests, "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens, "billed_prompt_tokens": u.billed_prompt_tokens,
            "billed_completion_tokens": u.billed_completion_tokens, "cost_usd": round(u.cost_usd, 8),
            "cache_hits": s.cache_hits, "wall_seconds": round(s.wall_seconds, 3), "rows_per_second": round(f.rate, 1),
            "failed_attempts": {f"{p}:{m}": dict(x.errors) for (p, m), x in s.per_model.items() if x.errors},
        },
        "models": models,
        "lanes": {lane: {"answers": u.ok, "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                         "cost_usd": round(u.cost_usd, 8), "second_answers": u.second_answers}
                  for lane, u in by_lane(s.per_model).items()},
    }
