"""The pump: reader -> bounded queue -> N workers -> sink, a monitor, and signals.

::

    reader:  input batches -> Requests (skipping rows already answered) -> Queue(2 x concurrency)
    workers: Router.route -> Sink.add (backpressure when the writer falls behind)
    monitor: flush timer, give-up timer, breaker warnings, progress; a few times a second

A stop (signal, budget, fatal provider error, disk error) ends the reader and
drops rows not yet started (a resume redoes them); rows in flight get a grace
period, then are cancelled. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from batch.progress import Progress, Tally
from batch.prompts import Request
from batch.result import Result, error_result
from batch.router import Router, RunStopped, Target
from batch.sinks import Sink

if TYPE_CHECKING:
    from batch.job import Job
    from batch.lanes import LaneManager
    from batch.output import Resume
    from batch.plan import Plan

MONITOR_SECONDS = 0.25
WORKERS_PER_SLOT = 4


class Stop:
    """Why and how the run stops; set once, read by every task."""

    def __init__(self, *, fresh: bool = False) -> None:
        self.reason: str | None = None
        # how to resume: the same command of a --fresh run would delete what this run wrote
        self.rerun = "rerun without --fresh" if fresh else "rerun the same command"
        self.collect_batches = False  # a budget stop: stop spending, but collect the batches already paid for
        self.hard = False
        self.event = asyncio.Event()
        self.hard_event = asyncio.Event()

    def request(self, reason: str, *, hard: bool = False, collect_batches: bool = False) -> None:
        if self.reason is None:
            self.reason, self.collect_batches = reason, collect_batches
        self.event.set()
        if hard:
            self.hard = True
            self.hard_event.set()


_DONE = object()  # one per worker at the end of the input


def _with_parts(requests: Iterable[Request], parts: list[int], start: int) -> Iterator[Request]:
    """Mark each redone row with the part holding its older result (the sink replaces it there)."""
    for req in requests:
        part = parts[req.row - start]
        yield req if part < 0 else req._replace(replaces=part)


class Pump:
    """One run's reader, workers and monitor; ``await Pump(...).run()``."""

    def __init__(self, job: Job, plan: Plan, resume: Resume, limit: int | None, grace_seconds: float,
                 router: Router, sink: Sink, stop: Stop, tally: Tally, progress: Progress,
                 targets: Sequence[Target], lanes: LaneManager | None = None) -> None:
        self.job, self.plan, self.limit, self.lanes = job, plan, limit, lanes
        self.done_mask, self.old_parts = resume.done_mask, resume.old_parts
        self.grace_seconds = grace_seconds
        self.router, self.sink, self.stop, self.tally, self.progress = router, sink, stop, tally, progress
        self.targets = list(targets)
        # More workers than requests in flight: a row waiting out a 429 or a backoff holds a worker, not one
        # of the `concurrency` slots of the router, so scattered waits do not stall the run.
        self.workers = job.run.concurrency * WORKERS_PER_SLOT
        self.queue: asyncio.Queue[Request | object] = asyncio.Queue(maxsize=2 * self.workers)
        self._opened = {t.model: 0 for t in self.targets}
        self._signals = 0
        self._lanes_task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Run reader, workers and monitor until the input is exhausted or the run stops."""
        installed = self._install_signals()
        read_task = asyncio.create_task(self.reader())
        workers = [asyncio.create_task(self.worker()) for _ in range(self.workers)]
        mon = asyncio.create_task(self.monitor())
        lanes = asyncio.create_task(self.lanes.run(self.queue)) if self.lanes is not None else None
        self._lanes_task = lanes
        try:
            await self._supervise(read_task, workers)
            if lanes is not None and self.stop.collect_batches and not self.stop.hard:
                await self._collect_batches(lanes)
            read_task.cancel()  # no-op when it has finished; else it may wait to put a sentinel nobody takes
            await asyncio.gather(read_task, return_exceptions=True)
        finally:
            tasks = (read_task, *workers, *([lanes] if lanes is not None else []))
            for task in tasks:  # cancelled from outside: no worker may outlive the session
                task.cancel()  # batches in flight stay recorded: a rerun reattaches to them
            await asyncio.gather(*tasks, return_exceptions=True)
            mon.cancel()
            loop = asyncio.get_running_loop()
            for sig in installed:
                loop.remove_signal_handler(sig)
            await asyncio.gather(mon, return_exceptions=True)

    async def _collect_batches(self, lanes: asyncio.Task[None]) -> None:
        """A budget stop ends spending, not collecting: the batches already submitted are paid for, so the run
        waits for their answers (the progress line shows them); Ctrl-C leaves them to a rerun."""
        assert self.lanes is not None
        self.lanes.stop_spending()
        while not self.queue.empty():  # unblocks a give-back waiting for room; nobody takes these rows now
            self.queue.get_nowait()
        if lanes.done():
            return
        self.progress.message(f"batch lane: {self.lanes.in_flight() or 'batches in flight'}; waiting for their "
                              "answers, already paid for (Ctrl-C leaves them to a rerun)")
        interrupted = asyncio.create_task(self.stop.hard_event.wait())
        await asyncio.wait({lanes, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        interrupted.cancel()

    async def reader(self) -> None:
        await self._read_input()
        if self.lanes is not None and self.stop.reason is None:
            for req in self.lanes.early:  # given back by the batch lane before the workers started
                await self.queue.put(req)
            await self.lanes.done.wait()  # rows batches give back come into the queue until then
            if self._lanes_task is not None and self._lanes_task.done():
                self._report_dead({self._lanes_task}, "the batch lane")
        for _ in range(self.workers):
            await self.queue.put(_DONE)

    async def _read_input(self) -> None:
        budget = self.limit
        plan, router, stop = self.plan, self.router, self.stop
        for batch in plan.batches(on_bad_line=lambda n, m: None):  # only reached with on_bad_row = "skip"
            ids = plan.builder.ids(batch)
            mask = self.done_mask.slice(batch.start, batch.size).to_pylist() if self.done_mask is not None else None
            requests: Iterable[Request] = plan.builder.build(batch, ids, mask)
            if self.old_parts is not None:
                requests = _with_parts(requests, self.old_parts.slice(batch.start, batch.size).to_pylist(),
                                       batch.start)
            if router.cache is not None:  # one cache query per batch, not one per row
                requests = list(requests)
                router.prefetch(requests)
            for req in requests:
                if stop.reason is not None or budget == 0:
                    break
                await self.queue.put(req)
                if budget is not None:
                    budget -= 1
            if stop.reason is not None:
                return  # the supervisor ends the workers
            if budget == 0:
                break
            await asyncio.sleep(0)  # let workers run between batches

    async def worker(self) -> None:
        skip_bad = self.job.run.on_bad_row == "skip"
        while True:
            req = await self.queue.get()
            if req is _DONE or self.stop.reason is not None:
                return
            assert isinstance(req, Request)
            if skip_bad and req.problem is not None:
                continue
            try:
                result = await self.router.route(req)
            except RunStopped:
                continue  # not recorded: a resume redoes this row
            except Exception as exc:  # a bug in batch, not a provider failure: never retried
                self.progress.message("internal error:\n" + "".join(traceback.format_exception(exc)))
                result = error_result(req, "internal", f"{type(exc).__name__}: {exc}", attempts=0)
            await self._record(result, req.replaces)

    async def _record(self, result: Result, replaces: int) -> None:
        sink, tally = self.sink, self.tally
        sink.add(result, replaces)
        if sink.backlogged:
            await sink.drain_writer()
        tally.count(result.status == "ok", replaces)

    async def monitor(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_SECONDS)
            self.sink.flush_if_due()
            if self.router.log is not None:
                self.router.log.flush_if_due()
            if self.sink.error is not None:
                self.stop.request(str(self.sink.error))
            self._check_give_up()
            self._check_reachable()
            self._warn_breakers()
            held = [f"{t.model} {'paused' if t.limiter.paused else 'at limit'}"
                    for t in self.targets if t.limiter.waiting]
            if self.lanes is not None and (flight := self.lanes.in_flight()):
                held.append(flight)
            # what was billed, as the summary counts it: failed attempts that were charged included
            self.tally.cost_usd = sum(t.stats.cost_usd for t in self.targets) + \
                (self.lanes.stats.cost_usd if self.lanes is not None else 0.0)
            self.progress.update(self.tally, ", ".join(held))

    def _check_give_up(self) -> None:
        router = self.router
        silent = time.monotonic() - router.last_success
        if router.failures_since_success and silent > self.job.run.give_up_seconds:
            self.stop.request(f"no model has answered for {silent:.0f}s ({router.failures_since_success} failures "
                              f"in a row); giving up (run.give_up_seconds). {self.stop.rerun.capitalize()} to resume.")

    def _check_reachable(self) -> None:
        """Nothing answered yet and the endpoint refuses connections: a server not started, a wrong base_url."""
        router = self.router
        since = router.unreachable_since
        if since is not None and not router.ever_answered and \
                time.monotonic() - since > self.job.run.unreachable_seconds:
            self.stop.request(f"cannot reach {router.unreachable_url} ({router.unreachable_error}); no request of "
                              f"this run was answered in {self.job.run.unreachable_seconds:g}s. Is the server "
                              f"running, and is the provider's base_url right? {self.stop.rerun.capitalize()} to "
                              "resume.")

    def _warn_breakers(self) -> None:
        for t in self.targets:
            if t.breaker.opened > self._opened[t.model]:
                self._opened[t.model] = t.breaker.opened
                self.progress.message(f"warning: {t.provider}:{t.model} failed {t.breaker.failures} times in a row "
                                      f"(last: {t.breaker.last_error}); skipping it for "
                                      f"{t.breaker.cooldown:g}s, then one probe")

    def _install_signals(self) -> list[signal.Signals]:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._on_signal)
                installed.append(sig)
        return installed

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals == 1 and self.stop.reason is None:
            self.stop.request(f"interrupted; {self.stop.rerun} to resume")
            self.progress.message(f"stopping: finishing requests in flight (up to {self.grace_seconds:g}s); "
                                  "press Ctrl-C again to stop at once")
        else:
            self.stop.request("interrupted", hard=True)

    async def _supervise(self, read_task: asyncio.Task[None], workers: list[asyncio.Task[None]]) -> None:
        """Wait for the workers; on a stop, give in-flight rows a grace period, then cancel.

        The reader puts one sentinel per worker when the input ends. On a stop the
        reader is cancelled, rows not yet started are dropped from the queue (a
        resume redoes them), and sentinels are put without waiting (the queue is
        empty then, and holds 2 x workers).
        """
        stop = self.stop
        pending: set[asyncio.Task[None]] = set(workers)
        deadline: float | None = None
        while pending:
            if stop.reason is not None and deadline is None:
                deadline = time.monotonic() + self.grace_seconds
                self.router.stopping = True  # no new request; those in flight may finish
                await self._drop_unstarted(read_task, len(workers))
            nothing_in_flight = deadline is not None and self.router.in_flight == 0
            if stop.hard or nothing_in_flight or (deadline is not None and time.monotonic() >= deadline):
                self.router.stopping = True
                for w in pending:
                    w.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                return
            waiter = asyncio.create_task((stop.hard_event if stop.reason else stop.event).wait())
            watch: set[asyncio.Task[object]] = {*pending, waiter}
            if not read_task.done():
                watch.add(read_task)
            timeout = None if deadline is None else min(0.1, max(0.0, deadline - time.monotonic()))
            done, _ = await asyncio.wait(watch, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            pending -= done
            if read_task in done and not read_task.cancelled() and read_task.exception() is not None:
                stop.request(f"cannot read input: {read_task.exception()}")
            self._report_dead(done - {read_task, waiter})

    def _report_dead(self, finished: Iterable[asyncio.Task[Any]], what: str = "a worker") -> None:
        """A task that ended with an exception is a bug in batch: say so and stop (a resume redoes its rows)."""
        for task in finished:
            if task.cancelled() or (exc := task.exception()) is None:
                continue
            self.progress.message(f"internal error: {what} stopped:\n" + "".join(traceback.format_exception(exc)))
            self.stop.request(f"internal error in batch: {what} stopped ({type(exc).__name__}: {exc}); "
                              "rows not yet written are redone when you rerun. Please report this.")

    async def _drop_unstarted(self, read_task: asyncio.Task[None], workers: int) -> None:
        read_task.cancel()
        await asyncio.gather(read_task, return_exceptions=True)
        while not self.queue.empty():
            self.queue.get_nowait()
        for _ in range(workers):
            self.queue.put_nowait(_DONE)
