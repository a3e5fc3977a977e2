"""The simulator's asynchronous Batch APIs: the batch state machine, its lines and what it counted.

It imitates what /work/shared/WIRE-BATCH.md (sections A and B) documents of
OpenRouter's inline batches and OpenAI's files + batches: the statuses
``validating -> in_progress -> finalizing -> completed`` (or ``failed``,
``expired``, ``cancelling -> cancelled``), lines that finish progressively,
expiry at the completion window (finished lines kept and billed, the rest
``batch_expired``), batch prices (50% of the chat price) and per-line
failures. What one line answers is batch/sim_batch_lines.py; the JSON each
API puts on the wire, batch/sim_batch_shapes.py; the routes,
batch/sim_batch_http.py.

Time is wall-clock seconds, scaled by ``SimConfig.batch_*`` knobs. Nothing
runs in the background: a batch's ``Timeline`` is fixed when it is created
(drawn from the seed and the batch's serial number) and its status is
computed when polled, so for a given seed, creation order and poll times the
answers are always the same. A cancel is the one thing that changes a
timeline after creation.

It does not imitate webhooks (``callback_url`` is accepted and ignored),
retention, endpoints other than chat completions, provider routing,
multimodal checks, or rate limits on the batch endpoints.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batch.sim_config import SimConfig
from batch.sim_batch_lines import Line, Outcome, draw, model_problem, outcome_for, prompt_tokens, token

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# The documented moves; a poller may see any path through them, skipping statuses it polled past.
NEXT: Mapping[str, frozenset[str]] = {
    "validating": frozenset({"in_progress", "failed", "expired", "cancelling"}),
    "in_progress": frozenset({"finalizing", "expired", "cancelling"}),
    "finalizing": frozenset({"completed", "cancelling"}),
    "cancelling": frozenset({"cancelled"}),
}
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


@dataclass(frozen=True, slots=True)
class Timeline:
    """When a batch changes status, in seconds after its creation; a pure value.

    >>> Timeline(validating=1, running=4, finalizing=1, window=60).status_at(2.5)
    'in_progress'
    """

    validating: float
    running: float  # from in_progress until the last line is done
    finalizing: float
    window: float  # lines not done by then expire
    invalid: bool = False  # fails validation when validating ends
    cancel_at: float | None = None
    cancel_drain: float = 0.0

    def _natural(self) -> tuple[tuple[float, str], ...]:
        v, w = self.validating, self.window
        if v >= w:  # only with a window scaled below the validation time
            return (0.0, "validating"), (w, "expired")
        if self.invalid:
            return (0.0, "validating"), (v, "failed")
        done = v + self.running
        if done > w:
            return (0.0, "validating"), (v, "in_progress"), (w, "expired")
        return (0.0, "validating"), (v, "in_progress"), (done, "finalizing"), (done + self.finalizing, "completed")

    def events(self) -> tuple[tuple[float, str], ...]:
        """(time, status) pairs in order; a cancel cuts the natural path short."""
        natural = self._natural()
        if self.cancel_at is None:
            return natural
        kept = tuple(e for e in natural if e[0] <= self.cancel_at)
        return (*kept, (self.cancel_at, "cancelling"), (self.cancel_at + self.cancel_drain, "cancelled"))

    def status_at(self, t: float) -> str:
        status = "validating"
        for at, name in self.events():
            if at <= t:
                status = name
        return status

    def done_at(self, t: float, n: int) -> int:
        """How many of ``n`` lines are finished at ``t``: they finish evenly during in_progress, and
        keep finishing while a cancel drains (the work in flight completes), until expiry or cancelled."""
        v = self.validating
        if self.invalid or v >= self.window or (self.cancel_at is not None and self.cancel_at <= v):
            return 0
        stop = min(t, self.window)
        if self.cancel_at is not None:
            stop = min(stop, self.cancel_at + self.cancel_drain)
        if stop >= v + self.running:  # compared before dividing, so float rounding cannot lose the last line
            return n
        if stop <= v:
            return 0
        return min(n, int(n * (stop - v) / self.running))


def plan(cfg: SimConfig, serial: int, invalid: bool) -> Timeline:
    """The timeline of the ``serial``-th batch: its running time is log-normal around the median, so most
    batches finish fast and a few take long (spread 1.68 puts 90% within 8.6x the median)."""
    u = min(max(draw(cfg.seed, "running", serial), 1e-12), 1 - 1e-12)
    running = cfg.batch_median_seconds * math.exp(cfg.batch_spread * statistics.NormalDist().inv_cdf(u))
    return Timeline(validating=cfg.batch_validating_seconds, running=running,
                    finalizing=cfg.batch_finalizing_seconds, window=cfg.batch_window_seconds, invalid=invalid)


@dataclass(frozen=True, slots=True)
class LineResult:
    """A line as a terminal batch reports it: ``kind`` is ok, error, expired or cancelled (never ran)."""

    index: int  # position in the submitted lines
    custom_id: str
    kind: str
    outcome: Outcome


@dataclass(slots=True)
class SimBatch:
    """One batch: its lines and timeline, and what the client did to it since (cancel, delete)."""

    id: str
    serial: int
    api: str  # "openrouter" or "openai"
    model: str
    endpoint: str
    lines: tuple[Line, ...]
    timeline: Timeline
    created_mono: float
    created_wall: float
    errors: tuple[Mapping[str, Any], ...] = ()  # why it fails validation: {code, message, line?}
    extra: dict[str, Any] = field(default_factory=dict)  # API-specific: input_file_id, metadata, files
    order: tuple[int, ...] = ()  # the order lines finish in
    outcomes: tuple[Outcome, ...] = ()  # per line, in submitted order
    deleted: bool = False
    _results: tuple[LineResult, ...] | None = None

    def elapsed(self, now: float) -> float:
        return now - self.created_mono

    def status(self, now: float) -> str:
        return self.timeline.status_at(self.elapsed(now))

    def done(self, now: float) -> int:
        return self.timeline.done_at(self.elapsed(now), len(self.lines))

    def counts(self, now: float) -> tuple[int, int, int]:
        """(completed, failed, expired) lines so far; expired is non-zero only once the batch expired."""
        k = self.done(now)
        failed = sum(1 for i in self.order[:k] if not self.outcomes[i].ok)
        expired = len(self.lines) - k if self.status(now) == "expired" else 0
        return k - failed, failed, expired

    def reached(self, now: float) -> dict[str, int]:
        """Unix seconds at which each status reached so far began."""
        t = self.elapsed(now)
        return {name: int(self.created_wall + at) for at, name in self.timeline.events() if at <= t}

    def results(self, now: float) -> tuple[LineResult, ...] | None:
        """Every line's result once terminal (None before): finished lines in the order they finished,
        then the lines that never ran. Fixed from then on, so pages and files are stable."""
        status = self.status(now)
        if self._results is None and status in TERMINAL:
            k = self.done(now)
            rest = "expired" if status == "expired" else "cancelled"
            finished = [LineResult(i, self.lines[i].custom_id, "ok" if self.outcomes[i].ok else "error",
                                   self.outcomes[i]) for i in self.order[:k]]
            skipped = [LineResult(i, self.lines[i].custom_id, rest, Outcome())
                       for i in sorted(self.order[k:])] if status != "failed" else []
            self._results = (*finished, *skipped)
        return self._results


@dataclass(frozen=True, slots=True)
class SimFile:
    """An uploaded input file or a batch's output or error file (OpenAI's Files API)."""

    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int
    expires_at: int | None


@dataclass(frozen=True, slots=True)
class BatchCounters:
    """What the Batch APIs received and settled: a snapshot, ``BatchBook.counters()``.

    Lines count as answered, failed, expired or cancelled once their batch is terminal (when the
    client can see them), at the time of the snapshot.
    """

    batches: Mapping[str, int]  # batches created, per API ("openrouter", "openai")
    submitted: Mapping[str, int]  # lines submitted per custom_id, over every batch (>1: sent twice)
    answered: Mapping[str, int]  # lines answered per custom_id
    lines_failed: int = 0
    lines_expired: int = 0
    lines_cancelled: int = 0  # lines a cancel kept from running
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0  # USD billed for answered lines, at the batch price
    cancels: int = 0  # cancel requests received
    files: int = 0  # files uploaded

    @property
    def lines_submitted(self) -> int:
        return sum(self.submitted.values())

    @property
    def lines_answered(self) -> int:
        return sum(self.answered.values())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot (under ``batch`` in ``GET /_sim/stats``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(batches=dict(self.batches), submitted=dict(self.submitted), answered=dict(self.answered),
                 lines_submitted=self.lines_submitted, lines_answered=self.lines_answered)
        return d


class BatchBook:
    """Every batch and file the simulator holds, for both APIs, and the counts behind ``counters()``."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.batches: dict[str, SimBatch] = {}
        self.files: dict[str, SimFile] = {}
        self._serial = 0  # batches created; with the seed it draws each batch's timeline
        self._boot = time.time_ns()  # part of every batch id: ids stay unique across restarts
        self._created: Counter[str] = Counter()
        self._submitted: Counter[str] = Counter()
        self._cancels = 0
        self._uploads = 0

    def add_file(self, filename: str, purpose: str, content: bytes, expires_after: float | None) -> SimFile:
        now = int(time.time())
        f = SimFile(id=f"file-{token(self.config.seed, 'file', len(self.files))}", filename=filename, purpose=purpose,
                    content=content, created_at=now,
                    expires_at=None if expires_after is None else now + int(expires_after))
        self.files[f.id] = f
        if purpose == "batch":
            self._uploads += 1
        return f

    def create(self, api: str, model: str, endpoint: str, lines: tuple[Line, ...],
               errors: tuple[Mapping[str, Any], ...] = (), extra: dict[str, Any] | None = None) -> SimBatch:
        """Store a batch whose submission was accepted; checks that fail later (validation) are decided
        now and revealed when validating ends."""
        cfg = self.config
        self._serial += 1
        serial, wall = self._serial, time.time()
        self._created[api] += 1
        self._submitted.update(line.custom_id for line in lines)
        problem = None if errors else model_problem(cfg, model)
        if problem is not None:
            errors = ({"code": "model_not_found", "message": problem},)
        outcomes = () if errors else tuple(outcome_for(cfg, model, line) for line in lines)
        tokens = sum(prompt_tokens(line, model) for line in lines)
        if not errors and api == "openai":
            errors = self._token_limit(model, tokens)
        # the serial restarts with the simulator: the boot time keeps a restarted one from reusing an id
        batch_id = (f"batch-{int(wall)}-{token(cfg.seed, api, serial, self._boot, length=20)}" if api == "openrouter"
                    else f"batch_{token(cfg.seed, api, serial, self._boot)}")
        order = tuple(sorted(range(len(lines)), key=lambda i: draw(cfg.seed, "order", serial, lines[i].custom_id)))
        batch = SimBatch(id=batch_id, serial=serial, api=api, model=model, endpoint=endpoint, lines=lines,
                         timeline=plan(cfg, serial, invalid=bool(errors)), created_mono=time.monotonic(),
                         created_wall=wall, errors=errors, extra={**(extra or {}), "prompt_tokens": tokens},
                         order=order, outcomes=outcomes)
        self.batches[batch_id] = batch
        return batch

    def _token_limit(self, model: str, tokens: int) -> tuple[Mapping[str, Any], ...]:
        """OpenAI's enqueued-token cap (WIRE-BATCH B5): the prompt tokens of this model's unfinished
        batches, counted when this one is created; over the cap it fails with token_limit_exceeded."""
        limit = self.config.batch_enqueued_token_limit
        if limit is None:
            return ()
        now = time.monotonic()
        enqueued = sum(b.extra["prompt_tokens"] for b in self.batches.values()
                       if b.api == "openai" and b.model == model and b.status(now) not in TERMINAL)
        if enqueued + tokens <= limit:
            return ()
        return ({"code": "token_limit_exceeded", "message": f"Enqueued token limit reached for {model} in "
                 f"organization org-sim. Limit: {limit:,} enqueued tokens. Please try again once some "
                 "in_progress batches have been completed."},)

    def cancel(self, batch: SimBatch, now: float) -> None:
        """Start draining: ``cancelling`` for batch_cancel_seconds, then ``cancelled``."""
        self._cancels += 1
        if batch.timeline.cancel_at is None:
            batch.timeline = dataclasses.replace(batch.timeline, cancel_at=batch.elapsed(now),
                                                 cancel_drain=self.config.batch_cancel_seconds)

    def counters(self, now: float | None = None) -> BatchCounters:
        now = time.monotonic() if now is None else now
        answered: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        tokens = [0, 0]
        cost = 0.0
        for batch in self.batches.values():  # deleted batches too: billing records are kept
            for r in batch.results(now) or ():
                kinds[r.kind] += 1
                if r.kind == "ok":
                    answered[r.custom_id] += 1
                    tokens[0] += r.outcome.usage["prompt_tokens"]
                    tokens[1] += r.outcome.usage["completion_tokens"]
                    cost += r.outcome.usage["cost"]
        return BatchCounters(batches=dict(self._created), submitted=dict(self._submitted), answered=dict(answered),
                             lines_failed=kinds["error"], lines_expired=kinds["expired"],
                             lines_cancelled=kinds["cancelled"], prompt_tokens=tokens[0],
                             completion_tokens=tokens[1], cost=round(cost, 12), cancels=self._cancels,
                             files=self._uploads)
