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
import signal
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import pyarrow as pa
import pyarrow.compute as pc

from batch.answers import Checker, make_checker, resolve_response_format, response_format
from batch.catalog import SIM_BASE_URL, facts_for, prices_for
from batch.errors import FatalError, InputError, OutputError, ProviderError
from batch.cache import ResponseCache, default_cache_path
from batch.job import Job, ModelSpec
from batch.limits import ModelLimiter
from batch.plan import Plan, describe_changes, fingerprint, make_plan, scan
from batch.progress import Progress, Tally
from batch.prompts import Request
from batch.provider import Endpoint, ModelInfo, fetch_models, make_endpoint, open_session
from batch.router import Breaker, Budget, Policy, Router, RunStopped, Target, error_result, model_prefix
from batch.sim import SimConfig, Simulator
from batch.sinks import (RESULTS_DIR, Ledger, Sink, part_files, read_manifest, reconcile, result_schema,
                          set_aside_damaged, write_manifest)
from batch.stats import ModelStats, Usage, append_stats, previous_cost, stats_rows

GRACE_SECONDS = 30.0
MONITOR_SECONDS = 0.25
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


class _Stop:
    """Why and how the run stops; set once, read by every task."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.hard = False
        self.event = asyncio.Event()
        self.hard_event = asyncio.Event()

    def request(self, reason: str, *, hard: bool = False) -> None:
        if self.reason is None:
            self.reason = reason
        self.event.set()
        if hard:
            self.hard = True
            self.hard_event.set()


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


def _targets(job: Job, sim_url: str | None, body_models: Iterable[str] = ()
             ) -> tuple[list[Target], dict[str, list[Target]]]:
    """The job's chain, and for OpenAI Batch lines that name their own model (body_model = "keep"),
    a chain starting at that model: on the first model's provider unless the chain already has it."""
    endpoints: dict[str, Endpoint] = {}
    require_key = job.run.cache != "replay"  # replay sends nothing, so CI needs no key

    def target(level: int, m: ModelSpec, server_fallback: list[str]) -> Target:
        spec = job.provider_of(m)
        if m.provider not in endpoints:
            base = sim_url if spec.base_url == SIM_BASE_URL and sim_url else spec.base_url
            endpoints[m.provider] = make_endpoint(spec.name, base, spec.api_key_env, spec.headers,
                                                  require_key=require_key)
        p_in, p_out = prices_for(m.model, m.price_input_per_million, m.price_output_per_million)
        facts = facts_for(m.model)
        rf = _response_format(job, facts.response_formats if facts else None)
        return Target(
            level=level, model=m.model, provider=m.provider,
            prefix=model_prefix(m.model, server_fallback, rf), server_fallback=tuple(server_fallback),
            cache_salt=spec.base_url.encode() + b"\0",
            endpoint=endpoints[m.provider], limiter=ModelLimiter(m.requests_per_minute, m.tokens_per_minute),
            breaker=Breaker(job.run.breaker_failures, job.run.breaker_cooldown_seconds),
            stats=ModelStats(m.label),
            price_in=p_in / 1e6 if p_in is not None else None,
            price_out=p_out / 1e6 if p_out is not None else None,
        )

    chain = []
    for level, m in enumerate(job.models):
        later = [x.model for x in job.models[level + 1:] if x.provider == m.provider]
        chain.append(target(level, m, later if job.run.server_fallback and job.run.fallback else []))
    targets = list(chain)
    row_chains: dict[str, list[Target]] = {}
    for name in sorted(body_models):
        own = next((t for t in chain if t.model == name), None)
        if own is None:
            own = target(len(targets), ModelSpec(provider=job.models[0].provider, model=name), [])
            targets.append(own)
        row_chains[name] = [own, *(t for t in chain if t is not own)]
    return targets, row_chains


def _response_format(job: Job, supported: tuple[str, ...] | None) -> dict[str, object] | None:
    """The response_format one model gets for the job's [output_format]; ``supported``: what it accepts."""
    fmt = job.output_format
    if fmt is None or fmt.json_schema is None:
        return None
    return response_format(fmt.json_schema, resolve_response_format(fmt.response_format, fmt.kind, supported))


def _formats_from(params: tuple[str, ...]) -> tuple[str, ...]:
    """OpenRouter's supported_parameters, as the response_format types a model accepts."""
    if "structured_outputs" in params:
        return ("json_schema", "json_object")
    return ("json_object",) if "response_format" in params else ()


async def _check_models(job: Job, session: aiohttp.ClientSession, targets: list[Target],
                        progress: Progress) -> None:
    """Live prices and availability from each provider's model list (run.check_models)."""
    listings: dict[str, dict[str, ModelInfo]] = {}
    for t in targets:
        if t.provider not in listings:
            try:
                listings[t.provider] = await fetch_models(session, t.endpoint)
            except ProviderError as exc:
                progress.message(f"warning: {t.provider}: {exc}; using built-in prices")
                listings[t.provider] = {}
        info = listings[t.provider].get(t.model)
        # a Batch line's own model (body_model = "keep") is not in [[models]]: no price overrides
        spec = job.models[t.level] if t.level < len(job.models) else ModelSpec(provider=t.provider, model=t.model)
        if info is None:
            if listings[t.provider]:
                progress.message(f"warning: {t.provider} does not list {t.model}; its rows will fall back")
            continue
        if spec.price_input_per_million is None and info.price_input is not None:
            t.price_in = info.price_input
        if spec.price_output_per_million is None and info.price_output is not None:
            t.price_out = info.price_output
        if info.supported_parameters is not None and job.output_format is not None:
            # the live list beats the catalog: structured outputs only where the provider says so
            rf = _response_format(job, _formats_from(info.supported_parameters))
            t.prefix = model_prefix(t.model, t.server_fallback, rf)


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

    stop = _Stop()
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
                    options: RunOptions, cache: ResponseCache | None, stop: _Stop, tally: Tally,
                    progress: Progress) -> list[Target]:
    """The sending part of a run: simulator, session, sink, router, pump. Returns the targets (with stats)."""
    out = job.output.path
    async with _maybe_sim(job) as sim_url:
        targets, row_chains = _targets(job, sim_url, body_models)

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
                await _check_models(job, session, targets, progress)
            budget = Budget(job.run.max_cost_usd, spent=previous_cost(out))
            router = Router(session, targets[:len(job.models)], policy, on_fatal, budget, on_budget,
                            cache=cache, row_chains=row_chains, checker=checker,
                            max_repairs=job.output_format.max_repairs if job.output_format else 0)
            await _pump(job, plan, done_mask, options, router, sink, stop, tally, progress, targets)
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


async def _pump(job: Job, plan: Plan, done_mask: pa.Array | None, options: RunOptions, router: Router, sink: Sink,
                stop: _Stop, tally: Tally, progress: Progress, targets: list[Target]) -> None:
    """Run reader, workers and monitor until the input is exhausted or the run stops."""
    n = job.run.concurrency
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=2 * n)
    done_sentinel = object()
    skip_bad = job.run.on_bad_row == "skip"

    async def reader() -> None:
        budget = options.limit
        for batch in plan.batches(on_bad_line=lambda n, m: None):  # only reached with on_bad_row = "skip"
            ids = plan.builder.ids(batch)
            mask = done_mask.slice(batch.start, batch.size).to_pylist() if done_mask is not None else None
            requests: Iterable[Request] = plan.builder.build(batch, ids, mask)
            if router.cache is not None:  # one cache query per batch, not one per row
                requests = list(requests)
                router.prefetch(requests)
            for req in requests:
                if stop.reason is not None or budget == 0:
                    break
                await queue.put(req)
                if budget is not None:
                    budget -= 1
            if stop.reason is not None:
                return  # the supervisor ends the workers
            if budget == 0:
                break
            await asyncio.sleep(0)  # let workers run between batches
        for _ in range(n):
            await queue.put(done_sentinel)

    async def worker() -> None:
        while True:
            req = await queue.get()
            if req is done_sentinel or stop.reason is not None:
                return
            if skip_bad and req.problem is not None:  # type: ignore[attr-defined]
                continue
            try:
                result = await router.route(req)  # type: ignore[arg-type]
            except RunStopped:
                continue  # not recorded: a resume redoes this row
            except Exception as exc:  # a bug in batch, not a provider failure: never retried
                progress.message("internal error:\n" + "".join(traceback.format_exception(exc)))
                result = error_result(req, "internal", f"{type(exc).__name__}: {exc}", attempts=0)  # type: ignore[arg-type]
            sink.add(result)
            if sink.backlogged:
                await sink.drain_writer()
            tally.done += 1
            if result.status == "ok":
                tally.ok += 1
                if result.cost_usd is not None:
                    tally.cost_usd += result.cost_usd
            else:
                tally.errors += 1

    opened = {t.model: 0 for t in targets}

    async def monitor() -> None:
        while True:
            await asyncio.sleep(MONITOR_SECONDS)
            sink.flush_if_due()
            if sink.error is not None:
                stop.request(str(sink.error))
            silent = time.monotonic() - router.last_success
            if router.failures_since_success and silent > job.run.give_up_seconds:
                stop.request(f"no model has answered for {silent:.0f}s ({router.failures_since_success} failures "
                             f"in a row); giving up (run.give_up_seconds). Rerun to resume.")
            for t in targets:
                if t.breaker.opened > opened[t.model]:
                    opened[t.model] = t.breaker.opened
                    progress.message(f"warning: {t.provider}:{t.model} failed {t.breaker.failures} times in a row "
                                     f"(last: {t.breaker.last_error}); skipping it for "
                                     f"{t.breaker.cooldown:g}s, then one probe")
            held = [f"{t.model} {'paused' if t.limiter.paused else 'at limit'}"
                    for t in targets if t.limiter.waiting]
            progress.update(tally, ", ".join(held))

    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            stop.request("interrupted; rerun the same command to resume")
            progress.message(f"stopping: finishing requests in flight (up to {options.grace_seconds:g}s); "
                             "press Ctrl-C again to stop at once")
        else:
            stop.request("interrupted", hard=True)

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
    read_task = asyncio.create_task(reader())
    workers = [asyncio.create_task(worker()) for _ in range(n)]
    mon = asyncio.create_task(monitor())
    try:
        await _supervise(read_task, workers, queue, done_sentinel, stop, router, options)
        read_task.cancel()  # no-op when it has finished; else it may wait to put a sentinel nobody takes
        await asyncio.gather(read_task, return_exceptions=True)
    finally:
        mon.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)
        await asyncio.gather(mon, return_exceptions=True)


async def _supervise(read_task: asyncio.Task[None], workers: list[asyncio.Task[None]],
                     queue: asyncio.Queue[object], sentinel: object, stop: _Stop, router: Router,
                     options: RunOptions) -> None:
    """Wait for the workers; on a stop, give in-flight rows a grace period, then cancel.

    The reader puts one sentinel per worker when the input ends. On a stop the
    reader is cancelled, rows not yet started are dropped from the queue (a
    resume redoes them), and sentinels are put without waiting (the queue is
    empty then, and holds 2 x workers).
    """
    pending: set[asyncio.Task[None]] = set(workers)
    deadline: float | None = None
    while pending:
        if stop.reason is not None and deadline is None:
            deadline = time.monotonic() + options.grace_seconds
            read_task.cancel()
            await asyncio.gather(read_task, return_exceptions=True)
            while not queue.empty():
                queue.get_nowait()
            for _ in workers:
                queue.put_nowait(sentinel)
        if stop.hard or (deadline is not None and time.monotonic() >= deadline):
            router.stopping = True
            for w in pending:
                w.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            return
        waiter = asyncio.create_task((stop.hard_event if stop.reason else stop.event).wait())
        watch: set[asyncio.Task[object]] = {*pending, waiter}  # type: ignore[arg-type]
        if not read_task.done():
            watch.add(read_task)  # type: ignore[arg-type]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = await asyncio.wait(watch, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        pending -= done  # type: ignore[operator]
        if read_task in done and not read_task.cancelled() and read_task.exception() is not None:
            stop.request(f"cannot read input: {read_task.exception()}")


async def _never() -> None:
    await asyncio.Event().wait()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(job: Job, **options: object) -> Summary:
    """Run a job from synchronous code (scripts, notebooks): ``batch.run(batch.load_job(p))``."""
    return asyncio.run(run_async(job, RunOptions(**options)))  # type: ignore[arg-type]
