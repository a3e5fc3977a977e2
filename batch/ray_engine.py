"""The Ray engine's driver: the same run as batch/runner.py, with the sending done by Ray Data workers.

::

    runner (driver): lock, preflight, fold leftover shards, resume state  -- exactly as a local run
    here:  ids still to send -> ray.data.from_arrow(blocks of (row, id))
           -> map_batches(RayWorker, compute=ActorPoolStrategy(size=N), batch_format="pyarrow")
           -> iter_batches on a thread -> Sink (the driver is the only writer of results/) -> progress
    end:   the workers' counters -> stats.parquet and the summary (runner); the run's shards deleted

Entry points: ``batch run JOB.toml --ray [ADDRESS]`` and
``batch.run(job, engine="ray", ray_address=None, ray_workers=N)``. Without an
address a local cluster is started for the run (loopback only, no
dashboard, no usage stats, more logical CPUs than cores: RAY.md found a
2-CPU resume deadlock) and shut down after it; with one, the driver joins
that cluster (``ray://host:10001`` or ``host:6379``).

Reasons for what differs from the issue's sketch: ``run.concurrency`` keeps
its meaning (requests in flight for the whole run) and is split across the
workers; the embedded simulator is started by the driver on 127.0.0.1, so a
job on ``provider = "sim"`` runs only on a cluster on this machine; the
batch lane (``run.lanes``) is refused on Ray (exit 2) for now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import pickle
import signal
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from batch.errors import JobError
from batch.progress import Progress, Tally
from batch.provider import open_session
from batch.pump import MONITOR_SECONDS, Stop
from batch.ray_limits import service_handle
from batch.ray_shards import drop_run, fold_shards, run_folder
from batch.ray_worker import RayWorker, merge_stats, read_worker_stats
from batch.result import Result
from batch.sinks import Sink
from batch.target import Target
from batch.targets import build_targets, check_models

if TYPE_CHECKING:
    from batch.job import Job
    from batch.output import Resume
    from batch.plan import ScanReport

DEFAULT_WORKERS = 2
WORKER_CPUS = 0.25  # logical CPUs per worker actor: they wait on the network
MAX_BLOCK_ROWS = 256  # a block is Ray's unit of retry: a dead actor's block comes back whole (shards skip its rows)
MIN_BLOCK_ROWS = 16
EXIT_AFTER_ENV = "BATCH_TEST_RAY_EXIT_AFTER"  # tests: a worker os._exit()s after this many answers, once per run


@contextlib.contextmanager
def ray_cluster(address: str | None) -> Iterator[None]:
    """Join ``address``, or start a local cluster for the run; a driver already connected (a notebook, the
    tests) is used as it is and left connected."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        except Exception as exc:  # a bad address, a missing ray[client] for ray://, a head that does not answer
            raise JobError(f"--ray {address}: cannot join this Ray cluster ({type(exc).__name__}: {exc}). Give "
                           "the head's address (HOST:6379; ray://HOST:10001 needs pip install 'ray[client]'), or "
                           "no address for a local cluster; nothing was sent") from None
    else:
        ray.init(num_cpus=max(4, 2 * (os.cpu_count() or 1)), include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def pending_rows(report: ScanReport, resume: Resume, limit: int | None) -> pa.Table:
    """(row, id) of every input row this run sends, in input order."""
    assert report.ids is not None, "the scan keeps the ids for the Ray engine"
    ids = report.ids.combine_chunks()
    rows = pa.array(range(len(ids)), pa.int64())
    table = pa.table({"row": rows, "id": ids})
    if resume.done_mask is not None:
        table = table.filter(pc.invert(resume.done_mask))
    return table.slice(0, limit) if limit is not None else table


def blocks_of(table: pa.Table, workers: int) -> list[pa.Table]:
    size = min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, math.ceil(table.num_rows / (workers * 4))))
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


async def send_on_ray(job: Job, report: ScanReport, resume: Resume, limit: int | None, run_id: str,
                      workers: int | None, address: str | None, grace_seconds: float, stop: Stop, tally: Tally,
                      progress: Progress, sim_url: str | None, schema: pa.Schema) -> list[Target]:
    """Send this run's rows on Ray; returns the driver's targets holding every worker's counters."""
    if "batch" in job.run.lanes:
        raise JobError("run.lanes: the batch lane does not run on Ray yet; run this job without --ray, "
                       "or with lanes = [\"online\"]; nothing was sent")
    from batch.runner import _check_priced

    targets, _ = build_targets(job, sim_url, report.body_models)
    if job.run.check_models and job.run.cache != "replay":
        async with open_session(4) as session:
            await check_models(job, session, targets, progress)
    _check_priced(job, targets)
    table = pending_rows(report, resume, limit)
    report.ids = None
    if not table.num_rows:
        return targets  # nothing to send: no cluster to start
    n = workers or DEFAULT_WORKERS
    out = job.output.path
    with ray_cluster(address):
        service = service_handle(out)
        await service.configure.remote(job.run.max_cost_usd, resume.spent)
        facts = {t.label: (t.price_in, t.price_out, t.prefix) for t in targets}
        worker_args = dict(job=job, run_id=run_id, sim_url=sim_url, concurrency=math.ceil(job.run.concurrency / n),
                           facts=facts, body_models=tuple(sorted(report.body_models)),
                           exit_after=int(os.environ.get(EXIT_AFTER_ENV, "0")))
        async with Sink(out, schema, flush_rows=job.output.flush_rows, flush_seconds=job.output.flush_seconds) as sink:
            await _consume(_dataset(table, n, worker_args), resume, sink, service, grace_seconds, stop, tally,
                           progress)
            if stop.reason is None and (reason := await service.stopped.remote()) is not None:
                stop.request(reason)  # a worker's stop that came after the monitor's last look
            await sink.drain()
            if sink.error is not None:
                stop.request(str(sink.error))
        folder = run_folder(out, run_id)
        for worker in read_worker_stats(folder):
            by_label = {s.label: s for s in worker}
            for t in targets:
                if t.label in by_label:
                    merge_stats(t.stats, by_label[t.label])
        if sink.error is None and stop.reason is None:
            drop_run(out, run_id)  # every row of the run is in a part now
        elif sink.error is None:  # stopped: workers may have answered rows the driver never took; keep them
            await fold_shards(out, schema, flush_rows=job.output.flush_rows, flush_seconds=job.output.flush_seconds)
        import ray

        ray.kill(service)  # its state is the run's; a killed driver leaves it for the next run to find
    return targets


def _dataset(table: pa.Table, workers: int, worker_args: dict[str, Any]) -> Any:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # the driver shows batch's own progress line
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = ray.data.from_arrow(blocks_of(table, workers))
    return ds.map_batches(RayWorker, fn_constructor_kwargs=worker_args, batch_size=None, batch_format="pyarrow",
                          compute=ActorPoolStrategy(size=workers), num_cpus=WORKER_CPUS, zero_copy_batch=True)


_END = object()


async def _consume(ds: Any, resume: Resume, sink: Sink, service: Any, grace_seconds: float, stop: Stop,
                   tally: Tally, progress: Progress) -> None:
    """Write what the workers hand back, as it comes; progress and stops meanwhile."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    quit_reading = threading.Event()

    def read() -> None:  # Ray's iterator blocks: a thread of its own
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                loop.call_soon_threadsafe(queue.put_nowait, batch)
                if quit_reading.is_set():
                    break
        except BaseException as exc:  # handed to the event loop, which stops the run with it
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        loop.call_soon_threadsafe(queue.put_nowait, _END)

    reader = threading.Thread(target=read, name="batch-ray-read", daemon=True)
    reader.start()
    monitor = asyncio.create_task(_monitor(sink, service, stop, tally, progress))
    installed = _install_signals(stop, service, progress, grace_seconds)
    old_parts = resume.old_parts.to_pylist() if resume.old_parts is not None else None
    try:
        while True:
            item = await _next(queue, stop, grace_seconds)
            if item is _END or item is None:
                break
            if isinstance(item, BaseException):
                stop.request(f"the Ray run failed ({type(item).__name__}: {item}); {stop.rerun} to resume")
                break
            assert isinstance(item, pa.Table)
            await _write(item, old_parts, sink, tally)
    finally:
        quit_reading.set()
        monitor.cancel()
        await asyncio.gather(monitor, return_exceptions=True)
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _next(queue: asyncio.Queue[object], stop: Stop, grace_seconds: float) -> object:
    """The next batch of rows; None when a stop's grace period is over (or a second signal came)."""
    while True:
        getter = asyncio.ensure_future(queue.get())
        waiter = asyncio.ensure_future(stop.hard_event.wait())
        timeout = grace_seconds if stop.reason is not None else None
        done, _ = await asyncio.wait({getter, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if getter in done:
            return getter.result()
        getter.cancel()
        if stop.hard or stop.reason is not None:
            return None


async def _write(batch: pa.Table, old_parts: list[int] | None, sink: Sink, tally: Tally) -> None:
    for row, blob in zip(batch["row"].to_pylist(), batch["result"].to_pylist()):
        result: Result = pickle.loads(blob)
        replaces = old_parts[row] if old_parts is not None else -1
        sink.add(result, replaces)
        tally.done += 1
        if replaces < 0:
            tally.new += 1
        if result.status == "ok":
            tally.ok += 1
        else:
            tally.errors += 1
    if sink.backlogged:
        await sink.drain_writer()


async def _monitor(sink: Sink, service: Any, stop: Stop, tally: Tally, progress: Progress) -> None:
    """A few times a second: flush timer, the workers' stop reason, progress."""
    while True:
        await asyncio.sleep(MONITOR_SECONDS)
        sink.flush_if_due()
        if sink.error is not None:
            stop.request(str(sink.error))
            service.request_stop.remote(str(sink.error))
        if stop.reason is None and (reason := await service.stopped.remote()) is not None:
            stop.request(reason)
        progress.update(tally, "")


def _install_signals(stop: Stop, service: Any, progress: Progress, grace_seconds: float) -> list[signal.Signals]:
    loop = asyncio.get_running_loop()
    installed = []

    def on_signal() -> None:
        if stop.reason is None:
            stop.request(f"interrupted; {stop.rerun} to resume")
            service.request_stop.remote(f"interrupted; {stop.rerun} to resume")
            progress.message(f"stopping: the workers finish requests in flight (up to {grace_seconds:g}s); "
                             "press Ctrl-C again to stop at once")
        else:
            stop.request("interrupted", hard=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
    return installed
