"""Wires the stages: reader -> bounded queue -> workers -> sink; progress; signals.

::

    lock the output (one writer per directory)
    preflight: keys, cache; plan.scan: the input (blocking checks, nothing sent; see batch/preflight.py)
    output: --fresh, fingerprint, runs that never ended, what is done
    pump: read_batches -> PromptBuilder.build -> Queue -> workers: Router.route -> Sink
    end: drain sink, stats.parquet, manifest, summary

Only this module sees the whole Job. Exit codes: 0 every row ok, 1 some
``error`` rows, 2 invalid job or input (nothing sent), 3 stopped early.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from batch.answers import Checker, make_checker
from batch.attempts import AttemptLog
from batch.budget import Budget
from batch.cache import ResponseCache, default_cache_path
from batch.catalog import SIM_BASE_URL
from batch.errors import FatalError, InputError, JobError
from batch.job import Job
from batch.lock import OutputLock
from batch.output import Resume, close_unfinished, prepare_output, resume_state
from batch.plan import Plan, ScanReport, make_plan, scan
from batch.progress import Frame, Progress, Tally, plural
from batch.preflight import check_setup
from batch.provider import open_session
from batch.pump import Pump, Stop
from batch.router import Policy, Router, Target
from batch.sim import SimConfig, Simulator
from batch.sinks import Sink, result_schema
from batch.ray_shards import fold_shards
from batch.spend import JOURNAL_PREFIX, SpendJournal, remove_journal
from batch.stats import Usage, append_stats, stats_rows
from batch.batch_records import BatchRecords
from batch.lane_start import start_lanes
from batch.stats import ModelStats
from batch.store import SHARDS_DIR, Ledger, error_rows, write_manifest
from batch.targets import build_targets, check_models

GRACE_SECONDS = 30.0
EXIT_OK, EXIT_ERRORS, EXIT_INVALID, EXIT_STOPPED = 0, 1, 2, 3
ENGINES = ("local", "ray")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    retry_errors: bool = False
    retry_truncated: bool = False
    force: bool = False
    fresh: bool = False
    limit: int | None = None  # None: the job's run.limit, if any
    quiet: bool = False
    grace_seconds: float = GRACE_SECONDS
    engine: str = "local"  # "ray": the same run on a Ray cluster (batch/ray_engine.py; pip install 'batch[ray]')
    ray_address: str | None = None  # engine "ray": the cluster to join; None starts a local one for the run
    ray_workers: int | None = None  # engine "ray": worker actors (default 2)


@dataclass(slots=True)
class Summary:
    """What a run did; ``exit_code`` follows DESIGN.md."""

    out_dir: Path
    exit_code: int = EXIT_OK
    stop_reason: str | None = None
    # the dataset: the output after this run, counting what earlier runs wrote
    rows_total: int = 0  # result rows in the dataset after this run
    rows_ok: int = 0
    rows_error: int = 0
    rows_input: int = 0  # rows of the input that should get a result (bad rows left out with on_bad_row = "skip")
    rows_left: int = 0  # input rows without a result after this run: exit 3, rerun to continue
    error_rows: dict[str, tuple[int, str]] = field(default_factory=dict)  # error_type -> (rows, one message)
    # this run
    rows_this_run: int = 0  # rows finished by this run, ok or error
    rows_this_run_ok: int = 0
    rows_this_run_error: int = 0
    rows_skipped: int = 0  # already answered by an earlier run
    cache_hits: int = 0  # rows of this run answered from the response cache
    cache_misses: int = 0  # rows looked up and not found (then sent, or in replay mode failed)
    cache_path: Path | None = None
    wall_seconds: float = 0.0
    per_model: dict[tuple[str, str], Usage] = field(default_factory=dict)

    @property
    def usage(self) -> Usage:
        """This run's requests, tokens and cost, all models together."""
        return sum(self.per_model.values(), Usage())

    def frame(self) -> Frame:
        """The last progress frame: the summary's own figures, so the screen ends on what the summary says."""
        return Frame(rows=self.rows_total, total=self.rows_input, run_rows=self.rows_this_run,
                     run_ok=self.rows_this_run_ok, run_errors=self.rows_this_run_error,
                     cost_usd=self.usage.cost_usd, seconds=self.wall_seconds)


@contextlib.asynccontextmanager
async def _maybe_sim(job: Job) -> AsyncIterator[str | None]:
    if any(job.providers[m.provider].base_url == SIM_BASE_URL for m in job.models):
        async with Simulator(SimConfig.from_options(job.sim.options)) as sim:
            yield sim.base_url
    else:
        yield None


async def run_async(job: Job, options: RunOptions | None = None, **overrides: Any) -> Summary:
    """Run a job to completion or to a stop; never raises for row-level failures.

    Options are a ``RunOptions`` or its fields as keywords (``quiet=True``).
    """
    options = _options(options, overrides)
    if options.engine not in ENGINES:
        raise JobError(f"engine: expected one of {', '.join(ENGINES)}, got {options.engine!r}")
    started = time.monotonic()
    check_setup(job)  # a missing key is said before a long scan (batch/preflight.py lists every check)
    with OutputLock(job.output.path):
        return await _run_locked(job, options, started)


@contextlib.contextmanager
def _early_signals() -> Iterator[threading.Event]:
    """During the (synchronous) input scan: Ctrl-C or SIGTERM sets the event, which the scan checks between
    batches. A plain signal handler, because the event loop does not run while the scan does."""
    event = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread (a notebook's run): no handler
            previous[sig] = signal.signal(sig, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _options(options: RunOptions | None, overrides: dict[str, Any]) -> RunOptions:
    known = {f.name for f in fields(RunOptions)}
    if unknown := sorted(set(overrides) - known):
        raise TypeError(f"unknown run option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    base = options or RunOptions()
    options = RunOptions(**{**{k: getattr(base, k) for k in known}, **overrides})
    if options.limit is not None and options.limit < 0:  # a negative limit once meant no limit at all
        raise JobError(f"--limit {options.limit}: expected a number of rows, 0 or more (omit it for no limit)")
    return options


async def _run_locked(job: Job, options: RunOptions, started: float) -> Summary:
    plan = make_plan(job)
    with _early_signals() as interrupted:
        report = scan(plan, interrupted.is_set)
    if blocking := report.blocking(job.run.on_bad_row):
        raise InputError(f"{job.input.path}: nothing was sent:\n  " + "\n  ".join(blocking))
    out = job.output.path
    summary = Summary(out_dir=out)
    cache, progress, finished = None, None, False
    if job.run.cache != "off":  # opened before anything is written: a replay without a cache is exit 2
        summary.cache_path = job.run.cache_path or default_cache_path()
        cache = ResponseCache(summary.cache_path, job.run.cache)
    try:
        manifest = prepare_output(job, fresh=options.fresh, force=options.force)
        close_unfinished(out, manifest)
        if (out / SHARDS_DIR).is_dir():  # a Ray run's driver was killed: its workers' answers into parts first
            await fold_shards(out, _schema(job, plan), flush_rows=job.output.flush_rows,
                              flush_seconds=job.output.flush_seconds)
        resume = resume_state(out, report, retry_errors=options.retry_errors,
                              retry_truncated=options.retry_truncated)
        summary.rows_skipped = resume.skipped
        summary.rows_input = report.rows - (report.bad_rows + report.missing_ids
                                            if job.run.on_bad_row == "skip" else 0)
        if "batch" not in job.run.lanes and options.engine != "ray":
            report.ids = None  # not needed any more: free them before sending (the batch lane needs them)
        progress = Progress(summary.rows_input, quiet=options.quiet, done_before=resume.before)
        await _run_output(job, plan, report, resume, options, cache, manifest, summary, progress)
        finished = True
    finally:
        if cache is not None:
            cache.close()
            summary.cache_hits, summary.cache_misses = cache.hits, cache.misses
        summary.wall_seconds = time.monotonic() - started
        if progress is not None:
            progress.close(summary.frame() if finished else None)
    return summary


async def _run_output(job: Job, plan: Plan, report: ScanReport, resume: Resume, options: RunOptions,
                      cache: ResponseCache | None, manifest: dict[str, Any], summary: Summary,
                      progress: Progress) -> None:
    """Record the run in the manifest, send, and finish the output (stats, manifest, exit code)."""
    out = job.output.path
    limit = options.limit if options.limit is not None else job.run.limit
    for warning in job.warnings:
        progress.message(f"warning: {warning}")
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    entry: dict[str, object] = {"run_id": run_id, "started": _now(), "ended": None, "outcome": "running",
                                "limits": {m.label: {"requests_per_minute": m.requests_per_minute,
                                                     "tokens_per_minute": m.tokens_per_minute} for m in job.models},
                                "max_cost_usd": job.run.max_cost_usd}
    manifest.setdefault("runs", []).append(entry)
    write_manifest(out, manifest)
    stop, tally = Stop(fresh=options.fresh), Tally()
    journal = SpendJournal(out, run_id)
    log = AttemptLog(out, run_id, flush_seconds=job.output.flush_seconds) if job.output.attempt_log else None
    try:
        lane_stats: list[ModelStats] = []
        if options.engine == "ray":
            targets = await _send_on_ray(job, plan, report, resume, limit, options, run_id, stop, tally, progress)
        else:
            targets, lane_stats = await _send_all(job, plan, report, resume, limit, options, cache, (journal, log),
                                                  stop, tally, progress)
    except JobError as exc:  # found only once the providers were asked (check_models): nothing was sent
        entry.update(ended=_now(), outcome="refused", stop_reason=str(exc))
        write_manifest(out, manifest)
        journal.close(delete=True)
        raise
    finally:
        if log is not None:
            log.close()
    for problem in (log.error if log is not None else None, journal.error):
        if problem is not None:
            progress.message(f"warning: {problem}")
    if cache is not None and cache.error is not None:
        progress.message(f"warning: {cache.error}; the results are complete, but later runs will "
                         "send these requests again")
    # keyed by the model's label: the same model may be in the chain twice, at two service tiers or lanes
    wall = time.monotonic() - progress.started
    summary.per_model = {(s.label.split(":", 1)[0], s.label.split(":", 1)[1]): s.freeze(wall)
                         for s in [*(t.stats for t in targets), *lane_stats]}
    _tally_up(out, summary, tally, stop.reason, limit, stop.rerun)
    _finish_output(out, run_id, manifest, entry, summary, tally, journal)
    if options.engine == "ray" and not journal.path.exists():  # deleted once stats.parquet was written
        for path in out.glob(f"{JOURNAL_PREFIX}{run_id}.*.bin"):  # the Ray workers': stats.parquet has them now
            remove_journal(path)


def _tally_up(out: Path, summary: Summary, tally: Tally, stopped: str | None, limit: int | None,
              rerun: str = "rerun") -> None:
    """The summary's rows, from this run's tally and the output as it now is; the exit code. ``rerun`` says
    how to resume (a --fresh run: without --fresh)."""
    summary.rows_this_run, summary.rows_this_run_ok, summary.rows_this_run_error = tally.done, tally.ok, tally.errors
    final = Ledger.read(out)
    summary.rows_ok, summary.rows_error = final.ok, final.errors
    summary.rows_total = summary.rows_ok + summary.rows_error
    summary.rows_left = max(0, summary.rows_input - summary.rows_total)
    if summary.rows_error:  # "why did 20 rows fail" is answered by the summary, not by pandas
        summary.error_rows = error_rows(out)
    summary.stop_reason = stopped
    if stopped is not None or summary.rows_left:
        summary.exit_code = EXIT_STOPPED  # a script that reruns until exit 0 must not stop at --limit
        left = f"{summary.rows_left} of {summary.rows_input} input rows have no result yet"
        summary.stop_reason = stopped or (f"{left} (--limit {limit}); {rerun} to continue" if limit is not None
                                          else f"{left}; {rerun} to resume")
        if held := len(BatchRecords(out).held_ids()):
            summary.stop_reason += (f". {plural(held, 'row')} {'is' if held == 1 else 'are'} in provider batches still running (`batch status {out}` "
                                    "shows them); a rerun collects them and sends none of them again")
    elif summary.rows_error:
        summary.exit_code = EXIT_ERRORS


async def _send_all(job: Job, plan: Plan, report: ScanReport, resume: Resume, limit: int | None,
                    options: RunOptions, cache: ResponseCache | None, records: tuple[SpendJournal, AttemptLog | None],
                    stop: Stop, tally: Tally, progress: Progress) -> tuple[list[Target], list[ModelStats]]:
    """The sending part of a run: simulator, session, sink, router, lanes, pump. Returns the targets (with
    stats) and the batch lane's stats."""
    out = job.output.path
    async with _maybe_sim(job) as sim_url:
        targets, row_chains = build_targets(job, sim_url, report.body_models)

        def on_fatal(e: FatalError) -> None:
            stop.request(f"the provider refused the run: {e}. Fix this, then {stop.rerun} to resume.")

        def on_budget() -> None:
            stop.request(f"budget reached: max_cost_usd ${job.run.max_cost_usd} would be passed by the next "
                         f"request. Raise max_cost_usd and {stop.rerun} to resume.", collect_batches=True)

        checker = _checker(job)
        async with open_session(job.run.concurrency) as session, Sink(
            out, _schema(job, plan), flush_rows=job.output.flush_rows, flush_seconds=job.output.flush_seconds,
        ) as sink:
            if job.run.check_models and job.run.cache != "replay":
                await check_models(job, session, targets, progress)
            _check_priced(job, targets)
            budget = Budget(job.run.max_cost_usd, spent=resume.spent, journal=records[0])
            router = Router(session, targets[:len(job.models)], _policy(job, plan), on_fatal, budget, on_budget,
                            cache=cache, row_chains=row_chains, checker=checker,
                            max_repairs=job.output_format.max_repairs if job.output_format else 0, log=records[1],
                            on_gone=lambda t: progress.message(_gone_message(job, t, targets)))
            lanes = await start_lanes(job, plan, report, resume, targets[0], session, sink, tally, progress, checker,
                                      budget, records[1]) if "batch" in job.run.lanes else None
            report.ids = None
            await Pump(job, plan, resume, limit, options.grace_seconds, router, sink, stop, tally, progress,
                       targets, lanes).run()
            await sink.drain()
            if sink.error is not None:
                stop.request(str(sink.error))
    return targets, [lanes.stats] if lanes is not None else []


async def _send_on_ray(job: Job, plan: Plan, report: ScanReport, resume: Resume, limit: int | None,
                       options: RunOptions, run_id: str, stop: Stop, tally: Tally, progress: Progress
                       ) -> list[Target]:
    if importlib.util.find_spec("ray") is None:
        raise JobError("--ray needs Ray: pip install 'batch[ray]'; nothing was sent")
    from batch.ray_engine import send_on_ray

    async with _maybe_sim(job) as sim_url:
        return await send_on_ray(job, report, resume, limit, run_id, options.ray_workers, options.ray_address,
                                 options.grace_seconds, stop, tally, progress, sim_url, _schema(job, plan))


def _gone_message(job: Job, t: Target, targets: list[Target]) -> str:
    later = [x.label for x in targets[t.level + 1:len(job.models)] if x.gone is None]
    fate = f"its rows go to {later[0]}" if later and job.run.fallback else "its rows end as error rows"
    return f"warning: {t.label}: {t.gone}. It is out of the chain for the rest of this run; {fate}"


def _policy(job: Job, plan: Plan) -> Policy:
    r = job.run
    return Policy(max_attempts=r.max_attempts, timeout=r.timeout_seconds, fallback=r.fallback,
                  backoff_base=r.backoff_base_seconds, backoff_max=r.backoff_max_seconds,
                  max_rate_limit_waits=r.max_rate_limit_waits, max_tokens=plan.max_tokens,
                  length_is_failure=r.length_is_failure, spill_on_rate_limit=r.spill_on_rate_limit,
                  keep_response_body=job.output.raw_response, max_wait=r.max_wait_seconds,
                  concurrency=r.concurrency)


def _check_priced(job: Job, targets: list[Target]) -> None:
    """With a cost cap, every model a row may go to needs a price before anything is sent."""
    if job.run.max_cost_usd is None:
        return
    unpriced = [t.model for t in targets if t.price_in is None or t.price_out is None]
    if unpriced:
        raise JobError(f"run.max_cost_usd needs a price for {', '.join(unpriced)}: neither the job, the built-in "
                       "table nor the provider's model list gives one. Set price_input_per_million and "
                       "price_output_per_million in [[models]]; nothing was sent")


def _schema(job: Job, plan: Plan) -> pa.Schema:
    checker = _checker(job)
    return result_schema(plan.keep_types, raw_response=job.output.raw_response,
                         parsed=checker.parsed_type if checker else None)


def _checker(job: Job) -> Checker | None:
    fmt = job.output_format
    if fmt is None:
        return None
    return make_checker(fmt.kind, labels=fmt.labels, normalize=fmt.normalize, schema=fmt.json_schema,
                        regex=fmt.regex)


def _finish_output(out: Path, run_id: str, manifest: dict[str, Any], entry: dict[str, object],
                   summary: Summary, tally: Tally, journal: SpendJournal) -> None:
    """Write stats.parquet and the manifest. Requests were sent, so a failure here is exit 3
    (the results on disk are intact and a rerun resumes), never exit 2."""
    problems = []
    journal.close(delete=False)
    try:
        append_stats(out, stats_rows(run_id, summary.per_model))
        journal.close(delete=True)  # stats.parquet holds this run's spend now
    except OSError as exc:
        problems.append(f"could not write stats.parquet ({exc}); this run's figures are only in the summary")
    entry.update(ended=_now(), outcome="stopped" if summary.stop_reason else "completed",
                 stop_reason=summary.stop_reason, rows_this_run=tally.done, rows_ok=summary.rows_ok,
                 rows_error=summary.rows_error, exit_code=summary.exit_code)
    try:
        write_manifest(out, manifest)
    except OSError as exc:
        problems.append(str(exc))
    if problems:
        summary.exit_code = EXIT_STOPPED
        summary.stop_reason = "; ".join(filter(None, [summary.stop_reason, *problems]))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(job: Job, options: RunOptions | None = None, **overrides: Any) -> Summary:
    """Run a job from synchronous code: ``batch.run(batch.load_job(p), quiet=True)``.

    Inside a running event loop (Jupyter), the run goes on a thread of its own,
    so ``batch.run`` works in a notebook cell too (``await batch.run_async(...)``
    is the native form there).
    """
    options = _options(options, overrides)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_async(job, options))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-run") as pool:
        return pool.submit(asyncio.run, run_async(job, options)).result()
