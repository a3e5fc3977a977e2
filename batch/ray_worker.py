"""The Ray engine's worker: batch's own request path inside an async callable class for ``map_batches``.

::

    block of (row, id) -> skip ids already in the run's shards (their stored results go back instead)
                       -> plan.requests_of: the Requests, rebuilt from the job's input
                       -> Router.route, concurrently (the same router, sender, provider, cache, checker)
                       -> each Result appended to this worker's shard the moment it is answered
                       -> (row, pickled Result) back to the driver, which writes results/

Each actor builds the request path once (plan, targets, session, router)
on its first block, with ``ClusterLimiter``s and a ``ClusterBudget`` that
share the output's one limiter actor (batch/ray_limits.py). A stop (signal
on the driver, budget, fatal provider error, a provider that cannot be
reached) is the actor's stop reason: workers poll it, stop starting
requests and return what they answered; rows not started are left for a
resume, as in a local run.

The requests of a block are rebuilt from the job's input (the dataset Ray
moves carries only row numbers and ids): an ``InputCursor`` per worker
reads on from where the last block ended, since a worker gets its blocks in
input order, so each worker reads the input about once; a block from
further back (a retried one) starts the read over.

Counters: after each block a worker writes its ``ModelStats`` whole to
``OUT/ray/RUN_ID/WORKER.stats``; the driver adds them up for stats.parquet
and the summary. A worker that crashes loses the counters of the block it
was in (its answers are safe in its shard, its spend in its journal until
the run ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pickle
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pyarrow as pa

from batch.cache import ResponseCache, default_cache_path
from batch.errors import FatalError
from batch.job import Job
from batch.plan import Plan, make_plan, requests_of
from batch.prompts import Request
from batch.provider import open_session
from batch.ray_limits import ClusterBudget, ClusterLimiter, service_handle
from batch.ray_shards import SUFFIX, ShardIndex, ShardWriter, run_folder
from batch.result import error_result
from batch.router import Router, RunStopped
from batch.sources import RowBatch
from batch.runner import _checker, _policy
from batch.spend import SpendJournal
from batch.stats import ModelStats
from batch.targets import build_targets

POLL_SECONDS = 0.25
STATS_SUFFIX = ".stats"


def empty_output() -> pa.Table:
    return pa.table({"row": pa.array([], pa.int64()), "result": pa.array([], pa.binary())})


class RayWorker:
    """``ds.map_batches(RayWorker, fn_constructor_kwargs=..., compute=ActorPoolStrategy(size=N),
    batch_format="pyarrow")``; the constructor's arguments are picklable values only."""

    def __init__(self, job: Job, run_id: str, sim_url: str | None, concurrency: int,
                 facts: dict[str, tuple[float | None, float | None, bytes]], body_models: tuple[str, ...] = (),
                 exit_after: int = 0) -> None:
        self.job, self.run_id, self.sim_url = job, run_id, sim_url
        self.facts = facts  # label -> (price in, price out, body prefix): what the driver learnt (check_models)
        self.body_models = body_models
        self.key = uuid.uuid4().hex[:12]  # a restarted actor is a new worker with a new shard
        self.folder = run_folder(job.output.path, run_id)
        self.concurrency = concurrency
        self.exit_after = exit_after  # tests: os._exit after this many answers (once per run)
        self.answered = 0
        self.plan = make_plan(job)
        self.cursor = InputCursor(self.plan, keep_problems=job.run.on_bad_row != "skip")
        self.index = ShardIndex(self.folder)
        self.shard = ShardWriter(self.folder / f"{self.key}{SUFFIX}")
        self.service = service_handle(job.output.path)
        self.router: Router | None = None
        self.stats: list[ModelStats] = []
        self.stop_reason: str | None = None
        self._exit = contextlib.AsyncExitStack()
        self.cache: ResponseCache | None = None
        self.budget: ClusterBudget | None = None
        self.session: aiohttp.ClientSession | None = None

    def __del__(self) -> None:
        """Ray Data drops the UDF when the pool ends gracefully (a crash skips this: nothing here is needed
        for correctness): hand back unused budget, close the shard, the cache and the connections."""
        with contextlib.suppress(Exception):
            if self.budget is not None:
                self.budget.give_back()
            self.shard.close()
            if self.cache is not None:
                self.cache.close()
            if self.session is not None and self.session.connector is not None:
                self.session.connector._close()  # the loop is gone: close the sockets without awaiting

    async def _open(self) -> Router:
        """The request path, once per actor (the session needs the actor's event loop)."""
        if self.router is not None:
            return self.router
        job = self.job
        targets, row_chains = build_targets(job, self.sim_url, self.body_models,
                                            lambda label, rpm, tpm: ClusterLimiter(self.service, label, rpm, tpm))
        for t in targets:
            if t.label in self.facts:
                t.price_in, t.price_out, t.prefix = self.facts[t.label]
        self.stats = [t.stats for t in targets]
        session = self.session = await self._exit.enter_async_context(open_session(self.concurrency))
        if job.run.cache != "off":
            self.cache = ResponseCache(job.run.cache_path or default_cache_path(), job.run.cache)
        journal = SpendJournal(job.output.path, f"{self.run_id}.{self.key}")
        self.budget = ClusterBudget(self.service, job.run.max_cost_usd, journal)
        policy = dataclasses.replace(_policy(job, self.plan), concurrency=self.concurrency)
        checker = _checker(job)
        self.router = Router(session, targets[:len(job.models)], policy, self._on_fatal, self.budget,
                             self._on_budget, cache=self.cache, row_chains=row_chains, checker=checker,
                             max_repairs=job.output_format.max_repairs if job.output_format else 0)
        return self.router

    def _stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.service.request_stop.remote(reason)
        if self.router is not None:
            self.router.stopping = True

    def _on_fatal(self, e: FatalError) -> None:
        self._stop(f"the provider refused the run: {e}. Fix this, then rerun the same command to resume.")

    def _on_budget(self) -> None:
        if self.budget is not None and self.budget.lost:
            self._stop("the limiter actor restarted and lost the cost cap's ledger; rerun to resume")
        else:
            self._stop(f"budget reached: max_cost_usd ${self.job.run.max_cost_usd} would be passed by the next "
                       "request. Raise max_cost_usd and rerun to resume.")

    async def __call__(self, batch: pa.Table) -> pa.Table:
        router = await self._open()
        if (reason := await self.service.stopped.remote()) is not None:
            self._stop(reason)
        if self.stop_reason is not None:
            return empty_output()
        self.index.refresh()
        stored = self.index.stored
        rows: list[int] = []
        blobs: list[bytes] = []
        todo: dict[str, int] = {}
        for row, id_ in zip(batch["row"].to_pylist(), batch["id"].to_pylist()):
            if id_ in stored:  # answered before this block was retried: not sent again
                rows.append(row)
                blobs.append(stored[id_])
            else:
                todo[id_] = row
        requests = self.cursor.requests({row: id_ for id_, row in todo.items()})
        watch = asyncio.create_task(self._watch(router))
        try:
            answers = await asyncio.gather(*(self._one(router, req) for req in requests))
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        for req, blob in zip(requests, answers):
            if blob is not None:
                rows.append(todo[req.id])
                blobs.append(blob)
        self._after_block()
        return pa.table({"row": pa.array(rows, pa.int64()), "result": pa.array(blobs, pa.binary())})

    async def _one(self, router: Router, req: Request) -> bytes | None:
        try:
            result = await router.route(req)
        except RunStopped:
            return None  # not recorded: a resume redoes this row
        except Exception as exc:  # a bug in batch, not a provider failure: never retried
            traceback.print_exception(exc)
            result = error_result(req, "internal", f"{type(exc).__name__}: {exc}", attempts=0)
        blob = self.shard.append(result)
        self.answered += 1
        if self.exit_after and self.answered >= self.exit_after:
            self._test_exit()
        return blob

    def _test_exit(self) -> None:
        """Tests: the actor dies as in a crash (os._exit), once per run."""
        marker = self.folder / ".exited"
        if not marker.exists():
            marker.touch()
            os._exit(1)

    async def _watch(self, router: Router) -> None:
        """While a block is sent: the run's stop reason, and a provider that never answers."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if (reason := await self.service.stopped.remote()) is not None:
                self._stop(reason)
            silent = time.monotonic() - router.last_success
            run = self.job.run
            if router.failures_since_success and silent > run.give_up_seconds:
                self._stop(f"no model has answered for {silent:.0f}s ({router.failures_since_success} failures in "
                           "a row); giving up (run.give_up_seconds). Rerun to resume.")
            since = router.unreachable_since
            if since is not None and not router.ever_answered and time.monotonic() - since > run.unreachable_seconds:
                self._stop(f"cannot reach {router.unreachable_url} ({router.unreachable_error}); no request of this "
                           f"run was answered in {run.unreachable_seconds:g}s. Is the server running, and is the "
                           "provider's base_url right? Rerun to resume.")

    def _after_block(self) -> None:
        """This worker's counters, for the driver's stats.parquet and summary (written whole, atomically)."""
        if self.cache is not None:
            self.cache._hand_over()
        if self.budget is not None and self.budget.journal is not None and self.budget.journal.error:
            self._stop(self.budget.journal.error)
        path = self.folder / f"{self.key}{STATS_SUFFIX}"
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_bytes(pickle.dumps(self.stats, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(temp, path)


class InputCursor:
    """The Requests of given input rows, reading the input forward from the last block's end."""

    def __init__(self, plan: Plan, *, keep_problems: bool) -> None:
        self.plan, self.keep_problems = plan, keep_problems
        self._batches: Iterator[RowBatch] | None = None
        self._held: RowBatch | None = None  # the input batch the last block ended in
        self._next_start = 0  # the first row of the next batch the reader gives

    def requests(self, rows: dict[int, str]) -> list[Request]:
        """``rows``: row number -> id. Rows whose id the input no longer has there are looked up by id."""
        if not rows:
            return []
        first, last = min(rows), max(rows)
        if self._batches is None or (self._held is not None and first < self._held.start) or \
                (self._held is None and first < self._next_start):
            self._batches, self._held, self._next_start = self.plan.batches(on_bad_line=lambda n, m: None), None, 0
        found: list[Request] = []
        seen: set[str] = set()
        while (batch := self._held or next(self._batches, None)) is not None:
            self._held, self._next_start = None, batch.start + batch.size
            if batch.start + batch.size <= first:
                continue
            skip = [batch.start + i not in rows for i in range(batch.size)]
            for r in self.plan.builder.build(batch, self.plan.builder.ids(batch), skip):
                if rows.get(r.row) == r.id:
                    seen.add(r.id)
                    if r.problem is None or self.keep_problems:
                        found.append(r)
            if batch.start + batch.size > last:
                self._held = batch  # the next block may start in it
                break
        if len(seen) < len(rows):  # not where the scan saw them (cannot happen with an unchanged input)
            found += requests_of(self.plan, None, set(rows.values()) - seen, keep_problems=self.keep_problems)
        return found


def read_worker_stats(folder: Path) -> list[list[ModelStats]]:
    """Every worker's last counters in a run's shard folder."""
    found = []
    for path in sorted(folder.glob(f"*{STATS_SUFFIX}")):
        with contextlib.suppress(OSError, pickle.UnpicklingError, EOFError):
            found.append(pickle.loads(path.read_bytes()))
    return found


def merge_stats(into: ModelStats, other: ModelStats) -> None:
    """Add one worker's counters of a model to the driver's."""
    from batch.stats import COUNTERS

    for name in COUNTERS:
        setattr(into, name, getattr(into, name) + getattr(other, name))
    into.errors.update(other.errors)
    into.latencies.extend(other.latencies)
    into.gone = into.gone or other.gone


__all__ = ["RayWorker", "empty_output", "merge_stats", "read_worker_stats"]
