"""``batch validate``: check the job, its setup and the whole input; send nothing.

It blocks (exit 2) on exactly what ``batch run`` blocks on: the list is
``batch.preflight.blocking``, which ``run`` checks too. The rest of what it
prints is what will happen to rows that can be sent but not answered.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from batch.cache import default_cache_path
from batch.catalog import facts_for
from batch.job import Job, load_job
from batch.plan import ScanReport, make_plan, scan
from batch.preflight import blocking as blocking_problems
from batch.progress import plural
from batch.runner import EXIT_INVALID


def add_validate_parser(sub: Any) -> None:
    v = sub.add_parser("validate", help="check the job file, its keys and cache, and the whole input; send nothing")
    v.add_argument("job", type=Path, help="the job file (TOML)")


def run_validate(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    plan = make_plan(job)
    report = scan(plan)
    rows = plan.total_rows if report.column_problems and plan.total_rows is not None else report.rows
    print(f"{args.job}: job file ok; {plural(rows, 'row')} in {job.input.path}")
    for warning in job.warnings:
        print(f"  warning: {warning}")
    _describe_setup(job)
    _describe_models(job)
    blocking = blocking_problems(job, report)
    for problem in blocking:
        print(f"  blocking: {problem}")
    if not report.column_problems:  # rows that miss a column the input lacks altogether are said above
        _describe_rows(job, report)
    if not report.blocking(job.run.on_bad_row):  # the estimate reads the input again: only a readable one
        _describe_windows(job)
    print("  blocked: fix the problems above; nothing can be sent" if blocking else "  ready to run")
    return EXIT_INVALID if blocking else 0


def _describe_setup(job: Job) -> None:
    if (fmt := job.output_format) is not None:
        what = {"labels": f"one of {len(fmt.labels)} labels", "regex": f"matching /{fmt.regex}/",
                "json_schema": "JSON that follows the schema"}[fmt.kind]
        print(f"  answers must be {what}; up to {fmt.max_repairs} repairs per model, then fallback, "
              "then invalid_output")
    if job.run.cache != "off":
        path = job.run.cache_path or default_cache_path()
        state = f"{path.stat().st_size:,} bytes" if path.exists() else "no file yet"
        print(f"  response cache {job.run.cache} at {path} ({state})")
    if job.run.check_models:
        print("  run.check_models: the providers' model lists were read (no request was sent, nothing billed)")


def _describe_models(job: Job) -> None:
    """Models that will not answer: retired by their provider (the catalog knows), or absent from the provider's
    model list (run.check_models, the user's permission to ask for it); and what the chain does instead."""
    listings = _listings(job) if job.run.check_models else {}
    for i, m in enumerate(job.models):
        facts = facts_for(m.model)
        listing = listings.get(m.provider)
        if facts is not None and facts.retired_on is not None:
            why = f"retired by its provider on {facts.retired_on}" + (
                f" (its successor: {facts.successor})" if facts.successor else "")
        elif listing is not None and m.model not in listing:
            why = f"not in {m.provider}'s model list (retired or misspelled)"
        else:
            continue
        later = [x.label for x in job.models[i + 1:]]
        fate = (f"its first 404 takes it out of the chain and its rows go to {later[0]}" if later and job.run.fallback
                else "no later model can answer: every row would end as an error row")
        print(f"  warning: models[{i}] {m.label}: {why}; {fate}")


def _listings(job: Job) -> dict[str, set[str]]:
    from batch.billing import read_listings

    listings, warnings = read_listings(job, job.models)
    for warning in warnings:
        print(f"  warning: {warning}")
    return {provider: set(models) for provider, models in listings.items()}


def _describe_rows(job: Job, report: ScanReport) -> None:
    if report.bad_rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(report.bad_by_type.items()))
        fate = {"error": "they will be error rows", "skip": "they will be left out",
                "fail": "the run will not start"}[job.run.on_bad_row]
        print(f"  {plural(report.bad_rows, 'row')} cannot be sent ({kinds}); run.on_bad_row = {job.run.on_bad_row!r}: {fate}")
        for example in report.bad_examples:
            print(f"    {example}")
    if report.body_models:
        named = ", ".join(f"{m} ({plural(n, 'line')})" for m, n in sorted(report.body_models.items()))
        print(f"  lines name their own model: {named}; each starts there, then falls back along [[models]] "
              "(input.body_model = \"keep\")")
    if report.bad_lines and job.run.on_bad_row == "skip":
        print(f"  {report.bad_lines} malformed lines will be left out, e.g. {report.bad_line_examples[0]}")


def _describe_windows(job: Job) -> None:
    from batch.estimate import estimate

    est = estimate(job, live_prices=False)  # validate only needs the context windows: no network
    smallest = min((m for m in est.models if m.context_window), key=lambda m: m.context_window or 0, default=None)
    if smallest is not None and smallest.rows_over_context:
        after = [m for m in est.models if m.context_window and m.context_window > (smallest.context_window or 0)]
        fate = (f"they fall back to {after[0].model}" if after else
                "no model has a larger window: they will be error rows with error_type context_length")
        print(f"  {smallest.rows_over_context} rows exceed the {smallest.context_window}-token window of "
              f"{smallest.model} (prompt estimate + max_tokens); {fate}")
