"""Starting the batch lane: its settings from the job, the rows it may take, and Requests rebuilt by id.

``start_lanes`` is called by the runner once the sink and router exist: it
reattaches to earlier batches, submits the rows still to do, and marks the
rows batches hold as done for the pump, so the online lane never sends them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import aiohttp
import pyarrow as pa
import pyarrow.compute as pc

from batch.answers import Checker
from batch.batch_records import BatchRecords
from batch.budget import Budget
from batch.catalog import SIM_BASE_URL
from batch.lane_plan import margin_for, parse_deadline
from batch.lanes import LaneManager, LaneSettings
from batch.plan import Plan, ScanReport
from batch.progress import Progress, Tally
from batch.sinks import Sink
from batch.store import Ledger
from batch.target import Target

if TYPE_CHECKING:
    from batch.attempts import AttemptLog
    from batch.job import Job
    from batch.output import Resume


async def start_lanes(job: Job, plan: Plan, report: ScanReport, resume: Resume, target: Target,
                      session: aiohttp.ClientSession, sink: Sink, tally: Tally, progress: Progress,
                      checker: Checker | None, budget: Budget, log: AttemptLog | None = None) -> LaneManager | None:
    """The batch lane for this run's first model: reattached, the rows still to do submitted, and the
    rows its batches hold added to what the pump skips. None when the provider has no Batch API."""
    api = job.provider_of(job.models[0]).batch_api
    if api is None:
        progress.message(f"batch lane: provider {target.provider!r} has no Batch API batch knows (set "
                         "batch_api in its [providers] table); every row goes online")
        return None
    run = job.run
    now = time.time()
    deadline = parse_deadline(run.deadline, now) if run.deadline else None
    settings = LaneSettings(deadline=deadline, rows_per_second=online_pace(job),
                            expected_seconds=run.batch_expected_seconds, poll_seconds=run.batch_poll_seconds,
                            batch_rows=run.batch_rows, margin_seconds=margin_for(deadline, now) if deadline else 0.0)
    ledger = Ledger.read(job.output.path)
    answered = pc.filter(ledger.ids, pc.equal(ledger.status, "ok")) if len(ledger.ids) else ledger.ids
    lanes = LaneManager(plan, target, api, session, sink, BatchRecords(job.output.path), settings, tally,
                        progress, checker, answered, budget, allow_online="online" in run.lanes)
    lanes.old_parts = resume.old_parts
    lanes.ephemeral = job.provider_of(job.models[0]).base_url == SIM_BASE_URL
    lanes.log = log
    ids = report.ids
    if ids is None:
        return lanes
    skipped = resume.done_mask if resume.done_mask is not None else pa.array([False] * len(ids))
    todo = pc.filter(ids, pc.invert(pc.or_(skipped, pc.is_in(ids, value_set=lanes.held()))))
    await lanes.start(todo)
    resume.done_mask = pc.or_(skipped, pc.is_in(ids, value_set=lanes.held())).combine_chunks()
    return lanes


def online_pace(job: Job) -> float:
    """Rows per second the online lane can answer, to plan with: the job's, else the first model's limit."""
    if job.run.online_rows_per_second:
        return job.run.online_rows_per_second
    rpm = job.models[0].requests_per_minute
    return rpm / 60 if rpm else float(job.run.concurrency)  # no limit: about one row per slot per second
