"""Wires the stages: reader -> bounded queue -> workers -> sink; progress; signals.

::

    plan.scan (blocking checks, nothing sent)
    read_batches -> PromptBuilder.build -> Queue(2 x concurrency)
        -> N workers: Router.route -> Sink.add -> parts (writer thread)
    monitor: flush timer, progress, stop conditions
    end: drain sink, stats.parquet, manifest, summary

Only this module sees the whole Job. Exit codes: 0 every row ok, 1 some
``error`` rows, 2 invalid job or input (nothing sent), 3 stopped early.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from batch.answers import Checker, make_checker
from batch.budget import Budget
from batch.cache import ResponseCache, default_cache_path
from batch.catalog import SIM_BASE_URL
from batch.errors import FatalError, InputError, OutputError
from batch.job import Job
from batch.plan import Plan, describe_changes, fingerprint, make_plan, scan
from batch.progress import Progress, Tally
from batch.provider import make_endpoint, open_session
from batch.pump import Pump, Stop
from batch.router import Policy, Router, Target
from batch.sim import SimConfig, Simulator
from batch.sinks import (RESULTS_DIR, Ledger, Sink, part_files, read_manifest, reconcile, result_schema,
                          set_aside_damaged, write_manifest)
from batch.stats import Usage, append_stats, previous_cost, stats_rows
from batch.targets import build_targets, check_models

GRACE_SECONDS = 30.0
EXIT_OK, EXIT_ERRORS, EXIT_INVALID, EXIT_STOPPED = 0, 1, 2, 3


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    retry_errors: bool = False
    retry_truncated: bool = False
    force: bool = False
    fresh: bool = False
    limit: int | None = None
    quiet: bool = False
    grace_seconds: float = GRACE_SECONDS


@dataclass(slots=True)
class Summary:
    """What a run did; ``exit_code`` follows DESIGN.md."""

    out_dir: Path
    exit_code: int = EXIT_OK
    stop_reason: str | None = None
    rows_total: int = 0  # result rows in the dataset after this run
    rows_ok: int = 0
    rows_error: int = 0
    rows_this_run: int = 0
    rows_skipped: int = 0  # already answered by an earlier run
    cache_hits: int = 0  # rows of this run answered from the response cache
    cache_misses: int = 0  # rows looked up and not found (then sent, or in replay mode failed)
    cache_path: Path | None = None
    wall_seconds: float = 0.0
    per_model: dict[tuple[str, str], Usage] = field(default_factory=dict)

    @property
    def usage(self) -> Usage:
        return sum(self.per_model.values(), Usage())


def prepare_output(job: Job, plan: Plan, options: RunOptions) -> dict[str, object]:
    """Check the output directory against this job; returns the manifest to continue."""
    out = job.output.path
    if options.fresh:
        shutil.rmtree(out / RESULTS_DIR, ignore_errors=True)
        for name in ("manifest.json", "stats.parquet"):
            (out / name).unlink(missing_ok=True)
    fp = fingerprint(job)
    manifest = read_manifest(out)
    if manifest is None:
        if part_files(out / RESULTS_DIR) and not options.force:
            raise OutputError(f"{out}: holds results but no manifest.json; use --force to add to them "
                              f"or --fresh to start over")
        return {"fingerprint": fp, "runs": []}
    changes = describe_changes(manifest.get("fingerprint", {}), fp)
    if changes and not options.force:
        raise OutputError(f"{out}: holds answers to a different job; changed since: " + "; ".join(changes)
                          + ". Rerun with --force to mix them anyway, --fresh to start over, or use another "
                          "output.path")
    manifest["fingerprint"] = fp
    return manifest


@contextlib.asynccontextmanager
async def _maybe_sim(job: Job) -> AsyncIterator[str | None]:
    if any(job.providers[m.provider].base_url == SIM_BASE_URL for m in job.models):
        async with Simulator(SimConfig.from_options(job.sim.options)) as sim:
            yield sim.base_url
    else:
        yield None


async def run_async(job: Job, options: RunOptions = RunOptions()) -> Summary:
    """Run a job to completion or to a stop; never raises for row-level failures."""
    started = time.monotonic()
    for m in job.models:  # a missing key is an invalid job: say so before reading anything
        spec = job.provider_of(m)
        make_endpoint(spec.name, spec.base_url, spec.api_key_env, spec.headers,
                      require_key=job.run.cache != "replay")
    plan = make_plan(job)
    report = scan(plan)
    if blocking := report.blocking(job.run.on_bad_row):
        raise InputError(f"{job.input.path}: nothing was sent:\n  " + "\n  ".join(blocking))
    out = job.output.path
    summary = Summary(out_dir=out)
    cache = None
    if job.run.cache != "off":  # opened before anything is written: a replay without a cache is exit 2
        summary.cache_path = job.run.cache_path or default_cache_path()
        cache = ResponseCache(summary.cache_path, job.run.cache)
    try:
        manifest = prepare_output(job, plan, options)
    except BaseException:
        if cache is not None:
            cache.close()
        raise
    for name in set_aside_damaged(out):
        print(f"warning: {out / RESULTS_DIR / name} is damaged (half-written or truncated) and was set aside "
              f"as .{name}.damaged; its rows will be redone", file=sys.stderr)
    reconcile(out)  # finish a superseding that a crash interrupted
    ledger = Ledger.read(out)
    skip = ledger.skip_set(retry_errors=options.retry_errors, retry_truncated=options.retry_truncated)
    done_mask = report.skip_mask(skip)
    report.ids = None  # the ids are not needed any more: free them before sending,
    pa.default_memory_pool().release_unused()  # and let the allocator give that memory back
    summary.rows_skipped = int(pc.sum(done_mask).as_py() or 0) if done_mask is not None else 0
    to_do = report.rows - summary.rows_skipped
    if options.limit is not None:
        to_do = min(to_do, options.limit)
    progress = Progress(to_do, quiet=options.quiet)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    history = manifest.setdefault("runs", [])
    assert isinstance(history, list)
    entry: dict[str, object] = {"run_id": run_id, "started": _now(), "ended": None, "outcome": "running"}
    history.append(entry)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, manifest)

    stop = Stop()
    tally = Tally()
    try:
        targets = await _send_all(job, plan, report.body_models, done_mask, options, cache, stop, tally,
                                  progress)
    finally:
        if cache is not None:
            cache.close()
            summary.cache_hits, summary.cache_misses = cache.hits, cache.misses
            if cache.error is not None:
                progress.message(f"warning: {cache.error}; the results are complete, but later runs will "
                                 "send these requests again")
    wall = time.monotonic() - started
    summary.per_model = {(t.provider, t.model): t.stats.freeze(wall) for t in targets}
    summary.wall_seconds = wall
    summary.rows_this_run = tally.done
    try:
        reconcile(out)  # rows redone by --retry-* replace their old rows
    except OSError as exc:
        stop.request(f"cannot rewrite older parts: {exc}")
    final = Ledger.read(out)
    summary.rows_ok, summary.rows_error = final.ok, final.errors
    summary.rows_total = summary.rows_ok + summary.rows_error
    summary.stop_reason = stop.reason
    expected = report.rows - (report.bad_rows + report.missing_ids if job.run.on_bad_row == "skip" else 0)
    if stop.reason is not None or (options.limit is None and summary.rows_total < expected):
        summary.exit_code = EXIT_STOPPED
        summary.stop_reason = stop.reason or f"{expected - summary.rows_total} rows have no result yet; rerun to resume"
    elif summary.rows_error:
        summary.exit_code = EXIT_ERRORS
    _finish_output(out, run_id, manifest, entry, summary, tally)
    return summary


async def _send_all(job: Job, plan: Plan, body_models: Iterable[str], done_mask: pa.Array | None,
                    options: RunOptions, cache: ResponseCache | None, stop: Stop, tally: Tally,
                    progress: Progress) -> list[Target]:
    """The sending part of a run: simulator, session, sink, router, pump. Returns the targets (with stats)."""
    out = job.output.path
    async with _maybe_sim(job) as sim_url:
        targets, row_chains = build_targets(job, sim_url, body_models)

        def on_fatal(e: FatalError) -> None:
            stop.request(f"the provider refused the run: {e}. Fix this, then rerun the same command to resume.")

        def on_budget() -> None:
            stop.request(f"budget reached: max_cost_usd ${job.run.max_cost_usd} would be passed by the next "
                         "request. Raise max_cost_usd and rerun to resume.")

        checker = _checker(job)
        schema = result_schema(plan.keep_types, raw_response=job.output.raw_response,
                               parsed=checker.parsed_type if checker else None)
        async with open_session(job.run.concurrency) as session, Sink(
            out, schema, flush_rows=job.output.flush_rows, flush_seconds=job.output.flush_seconds,
        ) as sink:
            policy = Policy(max_attempts=job.run.max_attempts, timeout=job.run.timeout_seconds,
                            fallback=job.run.fallback, backoff_base=job.run.backoff_base_seconds,
                            backoff_max=job.run.backoff_max_seconds,
                            max_rate_limit_waits=job.run.max_rate_limit_waits, max_tokens=plan.max_tokens,
                            length_is_failure=job.run.length_is_failure,
                            spill_on_rate_limit=job.run.spill_on_rate_limit,
                            keep_response_body=job.output.raw_response)
            if job.run.check_models and job.run.cache != "replay":
                await check_models(job, session, targets, progress)
            budget = Budget(job.run.max_cost_usd, spent=previous_cost(out))
            router = Router(session, targets[:len(job.models)], policy, on_fatal, budget, on_budget,
                            cache=cache, row_chains=row_chains, checker=checker,
                            max_repairs=job.output_format.max_repairs if job.output_format else 0)
            await Pump(job, plan, done_mask, options.limit, options.grace_seconds, router, sink, stop, tally, progress,
                       targets).run()
            await sink.drain()
            if sink.error is not None:
                stop.request(str(sink.error))
        progress.close(tally)
    return targets


def _checker(job: Job) -> Checker | None:
    fmt = job.output_format
    if fmt is None:
        return None
    return make_checker(fmt.kind, labels=fmt.labels, normalize=fmt.normalize, schema=fmt.json_schema,
                        regex=fmt.regex)


def _finish_output(out: Path, run_id: str, manifest: dict[str, object], entry: dict[str, object],
                   summary: Summary, tally: Tally) -> None:
    """Write stats.parquet and the manifest. Requests were sent, so a failure here is exit 3
    (the results on disk are intact and a rerun resumes), never exit 2."""
    problems = []
    try:
        append_stats(out, stats_rows(run_id, summary.per_model))
    except OSError as exc:
        problems.append(f"could not write stats.parquet ({exc}); this run's figures are only in the summary")
    entry.update(ended=_now(), outcome="stopped" if summary.stop_reason else "completed",
                 stop_reason=summary.stop_reason, rows_this_run=tally.done, rows_ok=summary.rows_ok,
                 rows_error=summary.rows_error, exit_code=summary.exit_code)
    try:
        write_manifest(out, manifest)
    except OutputError as exc:
        problems.append(str(exc))
    if problems:
        summary.exit_code = EXIT_STOPPED
        summary.stop_reason = "; ".join(filter(None, [summary.stop_reason, *problems]))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(job: Job, **options: object) -> Summary:
    """Run a job from synchronous code (scripts, notebooks): ``batch.run(batch.load_job(p))``."""
    return asyncio.run(run_async(job, RunOptions(**options)))  # type: ignore[arg-type]
