"""The batch lane: rows answered through a provider's Batch API at about half the price, against a deadline.

::

    start:  reattach to the batches earlier runs left (find / poll / collect), then
            submit the rows still to do (batch/lane_plan.py decides if there is time)
            -> the pump skips every row a batch holds
    poll:   every batch_poll_seconds: poll, collect finished batches, pull rows back
            online when the deadline needs it (batch/lane_plan.py)
    rows a batch gives back (failed, expired, pulled back, invalid answers)
            -> another batch while there is time, else the pump's queue (online)

Exactly once: a batch's rows are recorded before it is submitted and its id
right after (batch/batch_records.py); a line's answer becomes a result row
through the same sink as online answers (lane ``batch``, ``batch_id``), unless
the row was already answered (online after a pull-back, or by an earlier run):
then it is a second answer, billed by the provider, counted in stats
(``second_answers`` and cost), never a second row.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import pyarrow as pa

from batch.answers import Checker
from batch.budget import Budget
from batch.batch_api import BatchClient, batch_failure, client_for
from batch.batch_records import BatchRecord, BatchRecords
from batch.batch_wire import BATCH_NOT_FOUND, BatchInfo, SubmitUnknownError
from batch.catalog import BATCH_PRICE_FACTOR
from batch.errors import ProviderError
from batch.lane_plan import Outstanding, may_submit, to_pull_back
from batch.plan import Plan, requests_of
from batch.progress import Progress, Tally, money, plural
from batch.prompts import Request
from batch.provider import Reply
from batch.result import error_result, result_row
from batch.sinks import Sink
from batch.stats import BATCH_LANE_SUFFIX, ModelStats
from batch.store import ids_answered_by
from batch.target import Target

if TYPE_CHECKING:
    from batch.attempts import AttemptLog

MAX_BATCH_TRIES = 2  # batches a row may go to; then online (or, batch only, an error row)
FIND_PATIENCE_SECONDS = 120.0  # a submission whose answer was lost and that no listing shows is given up after


@dataclass(slots=True)
class LaneSettings:
    deadline: float | None  # unix time
    rows_per_second: float  # the online lane's pace, for planning
    expected_seconds: float
    poll_seconds: float
    batch_rows: int
    margin_seconds: float = 0.0  # be done this long before the deadline (lane_plan.margin_for)


class LaneManager:
    """One run's batch lane, for the chain's first model."""

    def __init__(self, plan: Plan, target: Target, api: str, session: aiohttp.ClientSession, sink: Sink,
                 records: BatchRecords, settings: LaneSettings, tally: Tally, progress: Progress,
                 checker: Checker | None, answered: pa.Array, budget: Budget, *, allow_online: bool = True) -> None:
        self.plan, self.target, self.session, self.sink = plan, target, session, sink
        self.client: BatchClient = client_for(api)
        self.records, self.settings, self.tally, self.progress, self.checker = records, settings, tally, progress, checker
        self.stats = ModelStats(label=target.label + BATCH_LANE_SUFFIX)
        self.answered: set[str] = set(answered.to_pylist())  # ok before this run: a line for them is a second answer
        self.released: set[str] = set()  # rows given to the online lane this run
        self.queue: asyncio.Queue[Request | object] | None = None
        self.early: list[Request] = []  # given back before the online lane started
        self.pulled: set[str] = set()  # batches whose rows went online for the deadline
        self.old_parts: pa.Array | None = None  # redone rows (--retry-*): the part holding each one's old row
        self.usable = True  # false once the provider says this model has no batch endpoint
        self.allow_online = allow_online  # lanes = ["batch"] alone: a row batches keep failing ends as an error
        self.tries: dict[str, int] = {}  # batches each given-back row has been in
        self.last_error: dict[str, ProviderError] = {}
        self.budget = budget  # max_cost_usd: a batch holds its worst case from submission to collection
        self.ephemeral = False  # the embedded simulator's batches, which end with the run
        self.log: AttemptLog | None = None  # the attempt log, one row per batch line collected
        self.spending = True  # false after a budget stop: batches in flight are collected, nothing new is sent
        self.written: set[str] = set()  # rows an interrupted collection already wrote: not second answers
        self.done = asyncio.Event()

    # --- start -----------------------------------------------------------------------------------------------

    async def start(self, todo: pa.Array | None) -> None:
        """Reattach to earlier batches, then submit ``todo`` (the rows not done and not held) if there is time."""
        await self._reattach()
        if todo is None or len(todo) == 0:
            return
        cancellable = self.client.api == "openai"
        deadline = self.settings.deadline
        if deadline is not None and not may_submit(time.time(), deadline, cancellable=cancellable,
                                                   expected_seconds=self.settings.expected_seconds, rows=len(todo),
                                                   rows_per_second=self.settings.rows_per_second,
                                                   margin=self.settings.margin_seconds):
            self.progress.message("batch lane: not enough time before the deadline for a provider batch; "
                                  "every row goes online")
            return
        await self.submit(self.requests_for(set(todo.to_pylist())))

    async def _reattach(self) -> None:
        pending = self.records.pending()
        for record in (*pending.unknown, *pending.running, *pending.finished):
            self.budget.hold(record.local_id, record.reserved_usd, reserved=False)  # the provider may still bill it
        if pending.finished:  # a collection a crash interrupted wrote some of its lines already
            self.written = ids_answered_by(self.records.dir.parent, {r.provider_id for r in pending.finished if r.provider_id})
        for record in pending.unknown:
            await self._find(record)
        if pending.running or pending.finished or pending.unknown:
            self.progress.message(f"batch lane: reattached to {len(pending.running) + len(pending.finished)} "
                                  f"batches of earlier runs")

    async def _find(self, record: BatchRecord) -> None:
        """A batch created but whose submission outcome is unknown (a crash, a lost answer)."""
        known = self.records.provider_ids()
        found = [b for b in await self.client.find(self.session, self.target.endpoint, model=record.model,
                                                   tag=record.tag, created_after=record.find_after,
                                                   total=record.rows) if b.id not in known]
        if len(found) == 1:
            self.records.mark_submitted(record.local_id, found[0])
        elif not found and time.time() - record.created_at > FIND_PATIENCE_SECONDS:
            self.records.mark_abandoned(record.local_id, "the provider lists no batch for this submission")
            self.budget.settle(record.local_id)

    def held(self) -> pa.Array:
        return self.records.held_ids()

    def in_flight(self) -> str:
        """For the progress line: the batches in flight and the rows they still owe."""
        running = self.records.pending().running
        if not running:
            return ""
        waited = [r for r in running if r.local_id not in self.pulled]  # pulled back: their rows are online now
        owed = sum(r.rows - (r.request_counts or {}).get("completed", 0) for r in waited)
        pulled = f" ({len(running) - len(waited)} pulled back online)" if len(waited) < len(running) else ""
        return f"{plural(len(running), 'batch', 'batches')} in flight{pulled}, {plural(owed, 'row')} owed"

    # --- submitting --------------------------------------------------------------------------------------------

    def stop_spending(self) -> None:
        """The budget is reached: collect what batches answer; submit nothing and send nothing online."""
        self.spending = False

    async def submit(self, requests: list[Request]) -> None:
        if not self.spending:
            return  # the rows stay without a result: a rerun with a larger max_cost_usd sends them
        size = max(1, min(self.settings.batch_rows, self.client.limits.max_lines))
        for start in range(0, len(requests), size):
            chunk = requests[start:start + size]
            if not self.usable or not await self._submit_one(chunk):
                await self.release(chunk)

    async def _submit_one(self, chunk: list[Request]) -> bool:
        """Record, then submit; False when max_cost_usd has no room for it or the provider refused it (its rows
        go online, where the cap stops the run when it is reached)."""
        t = self.target
        worst = sum(t.worst_cost(r.prompt_tokens, r.max_tokens or self.plan.max_tokens) for r in chunk) \
            * BATCH_PRICE_FACTOR
        if not self.budget.reserve(worst):
            self.progress.message(f"batch lane: max_cost_usd has no room for a batch of {plural(len(chunk), 'row')} "
                                  f"(up to {money(worst)}); they go online")
            return False
        record = self.records.create(api=self.client.api, provider=t.provider, model=t.model,
                                     ids=[r.id for r in chunk], reserved_usd=worst)
        self.budget.hold(record.local_id, worst, reserved=True)
        lines = [(r.id, r.body_for(t.prefix)) for r in chunk]
        try:
            info = await self.client.submit(self.session, t.endpoint, t.model, lines, record.tag)
        except SubmitUnknownError:
            return True  # it may have been accepted: the rows stay held; _find settles it
        except ProviderError as exc:
            self.records.mark_abandoned(record.local_id, str(exc))
            self.budget.settle(record.local_id)
            if exc.kind == "no_batch_endpoint":
                self.usable = False
                self.progress.message(f"batch lane: {t.model} has no batch endpoint ({exc.detail}); online only")
            return False
        self.records.mark_submitted(record.local_id, info)
        self.stats.requests += len(chunk)
        return True

    # --- polling -------------------------------------------------------------------------------------------------

    async def run(self, queue: asyncio.Queue[Request | object]) -> None:
        """Poll until no batch holds rows; rows given back go into ``queue`` (the online lane)."""
        self.queue = queue
        try:
            while self._waiting():
                await self.poll()
                if self._waiting():
                    await asyncio.sleep(self.settings.poll_seconds)
        finally:
            if self.ephemeral:  # its batches end with this run's simulator: no later run can collect them
                ended = [r for r in self.records.records() if r.holds_rows]
                for record in ended:
                    self.records.mark_abandoned(record.local_id, "the embedded simulator ended with its run")
                if ended:
                    self.progress.message(f"batch lane: {plural(len(ended), 'batch', 'batches')} of the embedded "
                                          f"simulator end with this run; a rerun sends their "
                                          f"{plural(sum(r.rows for r in ended), 'row')} again "
                                          "(a simulator started with `batch sim` keeps its batches across runs)")
            self.done.set()

    def _waiting(self) -> bool:
        """Is a batch still owed rows? A batch pulled back for the deadline is not: its rows went online
        (one that cannot be cancelled stays recorded; a later run collects it and counts its second answers)."""
        p = self.records.pending()
        return bool(p.unknown or p.finished or any(r.local_id not in self.pulled for r in p.running))

    async def poll(self) -> None:
        pending = self.records.pending()
        for record in pending.unknown:
            await self._find(record)
        for record in pending.running:
            if (info := await self._get(record)) is not None:
                record = self.records.mark_status(record.local_id, info)
                if info.terminal:
                    await self.collect(record, info)
        for record in self.records.pending().finished:
            if (info := await self._get(record)) is not None:
                await self.collect(record, info)
        await self._pull_back()

    async def _get(self, record: BatchRecord) -> BatchInfo | None:
        batch_id = record.provider_id
        assert batch_id is not None
        try:
            return await self.client.get(self.session, self.target.endpoint, batch_id)
        except ProviderError as exc:
            if exc.kind == BATCH_NOT_FOUND:
                await self._forget(record, f"the provider has no batch {batch_id} (another account or base_url, "
                                           "or a simulator that restarted)")
            else:  # a poll that failed is retried at the next poll
                self.progress.message(f"batch lane: cannot poll batch {batch_id}: {exc}; trying again")
            return None

    async def _forget(self, record: BatchRecord, why: str) -> None:
        """The provider will never answer this batch: its rows are free again, for another batch or online."""
        self.records.mark_abandoned(record.local_id, why)
        self.budget.settle(record.local_id)
        self.progress.message(f"batch lane: {why}; its {plural(record.rows, 'row')} "
                              f"{'is' if record.rows == 1 else 'are'} sent again")
        if record.local_id not in self.pulled:
            await self.give_back(self.requests_for(set(self.records.ids(record.local_id).to_pylist())))

    async def _pull_back(self) -> None:
        deadline = self.settings.deadline
        if deadline is None or not self.spending:
            return
        running = [r for r in self.records.pending().running if r.local_id not in self.pulled]
        owed = [Outstanding(r.local_id, r.rows - (r.request_counts or {}).get("completed", 0),
                            self.client.api == "openai", r.created_at) for r in running]
        backlog = self.queue.qsize() if self.queue is not None else 0
        for key in to_pull_back(time.time(), deadline, self.settings.rows_per_second, backlog, owed,
                                self.settings.margin_seconds, lookahead=self.settings.poll_seconds):
            record = self.records.get(key)
            self.pulled.add(key)
            self.progress.message(f"batch lane: the deadline needs {plural(record.rows, 'row')} of batch {record.provider_id} "
                                  "online now")
            if record.provider_id is not None:
                try:
                    await self.client.cancel(self.session, self.target.endpoint, record.provider_id)
                except ProviderError as exc:
                    self.progress.message(f"batch lane: cannot cancel batch {record.provider_id} ({exc}); a line "
                                          "it answers late is a second answer")
            await self.release(self.requests_for(set(self.records.ids(key).to_pylist())))

    # --- collecting ----------------------------------------------------------------------------------------------

    async def collect(self, record: BatchRecord, info: BatchInfo) -> None:
        """Every line of a terminal batch becomes a result row, goes back to another lane, or is a second answer.
        All lines are read before any is used: a read that fails halfway is redone whole at the next poll."""
        if (failure := batch_failure(info)) is not None and failure.kind == "no_batch_endpoint":
            self.usable = False
        try:
            lines = [line async for line in self.client.results(self.session, self.target.endpoint, info,
                                                                 model=record.model)]
        except (ProviderError, ValueError) as exc:
            self.progress.message(f"batch lane: cannot read the results of batch {info.id} yet: {exc}")
            return
        ids = set(self.records.ids(record.local_id).to_pylist())
        requests = {r.id: r for r in self.requests_for(ids)}
        back: list[Request] = []
        cost, prompt, completion = 0.0, 0, 0
        for line in lines:
            ids.discard(line.custom_id)
            if (req := requests.get(line.custom_id)) is not None:
                (c, p, q), then = self._line(req, line.reply, line.error, line.cost, info.id, back)
                cost, prompt, completion = cost + c, prompt + p, completion + q
                if self.log is not None:
                    self.log.add_batch_line(req.id, self.tries.get(req.id, 1), self.target, line, (c, p, q), then)
        back.extend(requests[i] for i in ids if i in requests and i not in self.released)  # never ran
        await self.sink.drain()  # the answers are on disk before the record lets its rows go
        # billed once per batch, journalled before the record says collected: a collection a crash interrupts
        # is redone whole by the next run, which bills it then (the provider billed each line once)
        self.budget.bill(self.stats.label, cost, prompt, completion)
        self.records.mark_collected(record.local_id, lines=len(lines))
        self.budget.settle(record.local_id)
        await self.give_back(back)

    def _line(self, req: Request, reply: Reply | None, error: ProviderError | None, cost: float | None,
              batch_id: str, back: list[Request]) -> tuple[tuple[float, int, int], str]:
        """A result row (then ``done``), a row to give back (``retry``, or ``repair`` online for an invalid
        answer), or a second answer. Returns what it was billed and which of these it was."""
        s = self.stats
        if error is not None or reply is None:
            s.errors[error.kind if error is not None else "bad_response"] += 1
            if error is not None:
                self.last_error[req.id] = error
            if req.id not in self.released and req.id not in self.answered:
                back.append(req)
                return (0.0, 0, 0), "retry"
            return (0.0, 0, 0), "second_answer"
        t = self.target
        source = "provider" if cost is not None else "price_table" if t.price_in is not None else None
        if cost is None and t.price_in is not None and t.price_out is not None:
            cost = (reply.prompt_tokens * t.price_in + reply.completion_tokens * t.price_out) * BATCH_PRICE_FACTOR
        billed = (cost or 0.0, reply.prompt_tokens, reply.completion_tokens)
        s.cost_usd += billed[0]
        s.billed_prompt_tokens += reply.prompt_tokens
        s.billed_completion_tokens += reply.completion_tokens
        rewritten = req.id in self.written  # an interrupted collection wrote its row, and counted nothing
        if not rewritten and (req.id in self.released or req.id in self.answered):
            s.second_answers += 1  # answered online meanwhile: billed twice, kept once
            return billed, "second_answer"
        parsed, problem = self.checker.check(reply.text) if self.checker is not None else (None, None)
        if problem is not None:
            s.invalid_outputs += 1
            back.append(req._replace(carried=billed))
            return billed, "repair"
        s.ok += 1
        s.prompt_tokens += reply.prompt_tokens
        s.completion_tokens += reply.completion_tokens
        self.answered.add(req.id)
        if rewritten:
            return billed, "done"
        result = result_row(req, attempts=1, reply=reply, provider=t.provider, level=0, parsed=parsed,
                            cost=cost, cost_source=source, lane="batch",
                            batch_id=batch_id, billed=(reply.prompt_tokens, reply.completion_tokens))
        self.sink.add(result, req.replaces)
        self.tally.count(True, req.replaces)
        return billed, "done"

    # --- giving rows back ----------------------------------------------------------------------------------------

    async def give_back(self, requests: list[Request]) -> None:
        """Rows a batch did not answer: another batch while there is time (twice at most), else online."""
        if not requests:
            return
        deadline = self.settings.deadline
        time_for_batch = self.usable and (deadline is None or may_submit(
            time.time(), deadline, cancellable=self.client.api == "openai",
            expected_seconds=self.settings.expected_seconds, rows=len(requests),
            rows_per_second=self.settings.rows_per_second, margin=self.settings.margin_seconds))
        again = []
        for req in requests:
            self.tries[req.id] = self.tries.get(req.id, 1) + 1
            if time_for_batch and (self.tries[req.id] <= MAX_BATCH_TRIES or not self.allow_online):
                again.append(req)
        rest = [r for r in requests if r not in again]
        if again and not self.allow_online:  # batch only: a row failing every time would loop forever
            rest += [r for r in again if self.tries[r.id] > MAX_BATCH_TRIES]
            again = [r for r in again if self.tries[r.id] <= MAX_BATCH_TRIES]
        if again:
            await self.submit(again)
        if self.allow_online:
            await self.release(rest)
        else:
            self._fail(rest)

    def _fail(self, requests: list[Request]) -> None:
        """lanes = ["batch"]: rows no batch answered in MAX_BATCH_TRIES end as error rows with the last error."""
        for req in requests:
            error = self.last_error.get(req.id) or ProviderError("no batch answered this row", kind="batch_failed")
            result = error_result(req, error.kind, str(error), attempts=self.tries.get(req.id, 1), level=0,
                                  model=self.target.model, charged=req.carried[0], billed=req.carried[1:])
            self.sink.add(result._replace(lane="batch"), req.replaces)
            self.tally.count(False, req.replaces)

    async def release(self, requests: Iterable[Request]) -> None:
        for req in requests:
            if not self.spending:
                return  # the online lane has stopped: these rows wait for a rerun
            if req.id in self.answered or req.id in self.released:
                continue
            self.released.add(req.id)
            if self.queue is not None:
                await self.queue.put(req)
            else:
                self.early.append(req)

    def requests_for(self, ids: set[str]) -> list[Request]:
        """The Requests of these rows, built from the input again (one read for a whole set)."""
        return requests_of(self.plan, self.old_parts, ids)
