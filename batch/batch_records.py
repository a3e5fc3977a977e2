"""The durable record of provider batches in the output directory: what makes the batch lane exactly-once.

The rule: **a batch's rows are recorded durably before its submission is
sent, and its provider id durably right after the provider accepts it.** So
after kill -9 at any instant, a rerun reattaches to every batch in flight and
never sends again a row the provider may still answer:

1. ``create`` writes the row ids, then the record (``planned``), and returns
   the ``tag`` to pass to ``submit``. Only then is the submission sent.
2. ``mark_submitted`` records the provider's id as soon as ``submit`` returns
   (or ``find`` locates a batch whose answer was lost).
3. ``mark_status`` records later polls; a terminal status moves the record to
   ``terminal`` (``mark_terminal`` insists on one).
4. ``mark_collected`` once every line the provider returned is a result row
   on disk; ``mark_abandoned`` when the provider will never answer (refused,
   never found, gone).

Layout, ``OUT/batches/`` beside ``results/`` (a dataset reader never looks here)::

    b000001.ids.parquet   the batch's row ids (its custom_ids), one string column ``id``; written first
    b000001.json          the record; replaced atomically (batch.atomic) at every change

A crash between the two files of ``create`` leaves an ids file without a
record: that create never returned, so nothing was sent, and the file is
removed at the next open. A half-written record cannot exist (atomic rename);
a record whose ids file is missing is refused loudly, since which rows it
holds would be unknown.

States (``state``; the provider's own word is ``status``)::

    planned    rows recorded; submission not sent yet, or sent with an unknown outcome   holds its rows
    submitted  the provider accepted it; its id is known                                holds its rows
    terminal   completed, failed, expired or cancelled (``status``); lines not on disk   holds its rows
    collected  everything the provider returned is on disk (possibly nothing)           releases them
    abandoned  the provider will never answer it (``reason`` says why)                   releases them

Moves only go forward: planned -> submitted | terminal | abandoned;
submitted -> submitted | terminal | abandoned; terminal -> terminal |
collected | abandoned. Repeating the last move is allowed (a rerun redoes
the step a crash interrupted); any other move raises ValueError, except a
non-terminal status reported for a terminal batch (a stale poll), which is
ignored.

``held_ids`` is the set of rows the online lane must not send: every row of
a record in a holding state. Rows of a collected batch that got no result line
(cancelled before they ran, a failed batch) are free again: the ledger shows
them not done. Ids stay in Arrow arrays: a 400k-row job is ~80 arrays, never
a Python object per row.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.atomic import replacing, write_atomic
from batch.batch_wire import API_NAMES, CLOCK_SKEW_SECONDS, BatchInfo
from batch.errors import OutputError

BATCHES_DIR = "batches"
FORMAT = 1
STATES = ("planned", "submitted", "terminal", "collected", "abandoned")
HOLDING = frozenset({"planned", "submitted", "terminal"})
# Where each state may go next (itself included: a rerun repeats the step a crash interrupted).
MOVES = {
    "planned": frozenset({"planned", "submitted", "terminal", "abandoned"}),
    "submitted": frozenset({"submitted", "terminal", "abandoned"}),
    "terminal": frozenset({"terminal", "collected", "abandoned"}),
    "collected": frozenset({"collected"}),
    "abandoned": frozenset({"abandoned"}),
}
_NAME_RE = re.compile(r"^(b\d{6,})(\.json|\.ids\.parquet)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchRecord:
    """One batch as this output knows it; the JSON file holds exactly these fields."""

    local_id: str
    tag: str  # pass to submit: OpenAI carries it in metadata, so find() can match it
    api: str  # "openrouter" or "openai"
    provider: str  # the job's provider name, to rebuild the endpoint on a rerun
    model: str
    rows: int
    state: str
    created_at: float  # wall clock, before the submission was sent
    updated_at: float
    provider_id: str | None = None
    status: str | None = None  # the provider's last status seen
    request_counts: dict[str, int] | None = None
    expires_at: int | None = None
    error: str | None = None  # why the provider failed it
    lines: int | None = None  # lines collected
    reason: str | None = None  # why it was abandoned
    reserved_usd: float = 0.0  # its lines' worst-case cost at the batch price, held against max_cost_usd

    @property
    def holds_rows(self) -> bool:
        return self.state in HOLDING

    @property
    def find_after(self) -> float:
        """``created_after`` for ``find``: the creation time, less the clock skew the provider may have."""
        return self.created_at - CLOCK_SKEW_SECONDS

    def to_json(self) -> bytes:
        return orjson.dumps({"format": FORMAT, **dataclasses.asdict(self)}, option=orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, raw: bytes, where: Path) -> BatchRecord:
        try:
            data = orjson.loads(raw)
            if data.pop("format", None) != FORMAT or data.get("state") not in STATES:
                raise ValueError("unknown format or state")
            return cls(**data)
        except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError) as exc:
            raise OutputError(f"{where}: not a batch record this version of batch can read ({exc}); "
                              "it may hold rows a provider is still answering, so it is not ignored") from None


@dataclass(frozen=True, slots=True)
class Pending:
    """The records that still need the caller, by what to do with them."""

    unknown: tuple[BatchRecord, ...]  # planned: find(tag/model/rows, find_after), then mark_submitted or abandon
    running: tuple[BatchRecord, ...]  # submitted: get() until terminal, mark_status
    finished: tuple[BatchRecord, ...]  # terminal: read results, write rows, mark_collected


def ids_path(directory: Path, local_id: str) -> Path:
    return directory / f"{local_id}.ids.parquet"


def record_path(directory: Path, local_id: str) -> Path:
    return directory / f"{local_id}.json"


def write_ids(path: Path, ids: pa.Array) -> None:
    """The row ids, atomically (fsync, rename, fsync the directory)."""
    with replacing(path) as tmp:
        pq.write_table(pa.table({"id": ids}), tmp)


def read_ids(path: Path) -> pa.Array:
    try:
        return pq.read_table(path, columns=["id"])["id"].combine_chunks()
    except (OSError, pa.ArrowInvalid) as exc:
        raise OutputError(f"{path}: cannot read the row ids of a batch ({exc}); they may be rows a provider is "
                          "still answering, so the run stops rather than send them twice") from None


def as_ids(ids: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """Row ids as one Arrow string array; refuses none, nulls and repeats."""
    array = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else \
        ids if isinstance(ids, pa.Array) else pa.array(list(ids), pa.string())
    if not pa.types.is_string(array.type) and not pa.types.is_large_string(array.type):
        array = array.cast(pa.string())
    if len(array) == 0:
        raise ValueError("a batch needs at least one row id")
    if array.null_count:
        raise ValueError("row ids may not be null")
    if len(pc.unique(array)) != len(array):
        raise ValueError("a row id appears twice in one batch")
    return array


class BatchRecords:
    """Every batch this output has recorded; the one writer's view (hold the output lock).

    >>> records = BatchRecords(out_dir)                          # doctest: +SKIP
    >>> rec = records.create(api="openrouter", provider="openrouter", model=m, ids=ids)  # doctest: +SKIP
    >>> info = await client.submit(session, endpoint, m, lines, rec.tag)                 # doctest: +SKIP
    >>> records.mark_submitted(rec.local_id, info)                                       # doctest: +SKIP
    """

    def __init__(self, out_dir: Path, *, writer: bool = True) -> None:
        """``writer``: this process holds the output lock, so leftovers of a crash are its to clear; a reader
        (``batch status``, beside a running run) must not, since they may be a create in progress."""
        self.dir = out_dir / BATCHES_DIR
        self.writer = writer
        self._records: dict[str, BatchRecord] = {}
        self._ids: dict[str, pa.Array] = {}  # of holding records only
        self._last = 0  # the highest local number seen, records and stray ids files alike
        self._load()

    def _load(self) -> None:
        if not self.dir.is_dir():
            return
        names: dict[str, set[str]] = {}
        for path in self.dir.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                if self.writer:
                    path.unlink(missing_ok=True)  # a write a crash interrupted: the old file is still whole
            elif m := _NAME_RE.match(path.name):
                names.setdefault(m.group(1), set()).add(m.group(2))
                self._last = max(self._last, int(m.group(1)[1:]))
        for local_id, kinds in sorted(names.items()):
            if ".json" not in kinds:  # a create that never returned: nothing was sent for these rows
                if self.writer:
                    ids_path(self.dir, local_id).unlink(missing_ok=True)
                continue
            path = record_path(self.dir, local_id)
            record = BatchRecord.from_json(path.read_bytes(), path)
            self._records[local_id] = record
            if record.holds_rows:
                self._ids[local_id] = read_ids(ids_path(self.dir, local_id))

    def records(self) -> list[BatchRecord]:
        return [self._records[k] for k in sorted(self._records)]

    def get(self, local_id: str) -> BatchRecord:
        try:
            return self._records[local_id]
        except KeyError:
            raise KeyError(f"no batch record {local_id!r} in {self.dir}") from None

    def ids(self, local_id: str) -> pa.Array:
        """The row ids of a batch (read from disk for one that no longer holds them)."""
        self.get(local_id)
        return self._ids[local_id] if local_id in self._ids else read_ids(ids_path(self.dir, local_id))

    def held_ids(self) -> pa.Array:
        """Every row a planned, submitted or terminal (not collected) batch holds: never send these online."""
        arrays = [self._ids[k] for k in sorted(self._ids)]
        return pa.concat_arrays(arrays) if arrays else pa.array([], pa.string())

    def pending(self) -> Pending:
        by_state: dict[str, list[BatchRecord]] = {s: [] for s in STATES}
        for record in self.records():
            by_state[record.state].append(record)
        return Pending(tuple(by_state["planned"]), tuple(by_state["submitted"]), tuple(by_state["terminal"]))

    def provider_ids(self) -> set[str]:
        """Provider ids already recorded: a find() candidate among them is another record's batch."""
        return {r.provider_id for r in self._records.values() if r.provider_id is not None}

    def create(self, *, api: str, provider: str, model: str, ids: Sequence[str] | pa.Array | pa.ChunkedArray,
               now: float | None = None, reserved_usd: float = 0.0) -> BatchRecord:
        """Record a batch's rows durably (planned); send its submission only after this returns."""
        if not self.writer:
            raise RuntimeError("BatchRecords(writer=False) reads only; the run holding the output lock writes")
        if api not in API_NAMES:
            raise ValueError(f"unknown batch API {api!r}; expected one of {', '.join(API_NAMES)}")
        array = as_ids(ids)
        held = self.held_ids()
        if len(held):  # hash the new batch's ids and probe the held ones: cheaper than hashing every held row
            clash = pc.filter(held, pc.is_in(held, value_set=array))
            if len(clash):
                raise ValueError(f"row {clash[0].as_py()!r} is already held by another batch of this output; "
                                 "a row goes to one batch at a time")
        local_id = f"b{self._last + 1:06d}"
        now = time.time() if now is None else now
        record = BatchRecord(local_id=local_id, tag=f"{local_id}-{secrets.token_hex(8)}", api=api, provider=provider,
                             model=model, rows=len(array), state="planned", created_at=now, updated_at=now,
                             reserved_usd=reserved_usd)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_ids(ids_path(self.dir, local_id), array)  # first: a record never names rows that are not on disk
        self._last += 1
        self._write(record)
        self._ids[local_id] = array
        return record

    def mark_submitted(self, local_id: str, info: BatchInfo) -> BatchRecord:
        """The provider accepted the batch (submit's answer, or find's): record its id, at once."""
        record = self.get(local_id)
        if record.provider_id not in (None, info.id):
            raise ValueError(f"{local_id} is provider batch {record.provider_id}, not {info.id}")
        if info.api != record.api:
            raise ValueError(f"{local_id} went to {record.api}, not {info.api}")
        return self._seen(record, info)

    def mark_status(self, local_id: str, info: BatchInfo) -> BatchRecord:
        """A later poll: record the status (a terminal one moves the record to ``terminal``) and counts."""
        record = self.get(local_id)
        if record.provider_id != info.id:
            raise ValueError(f"{local_id} is provider batch {record.provider_id}, not {info.id}")
        return self._seen(record, info)

    def mark_terminal(self, local_id: str, info: BatchInfo) -> BatchRecord:
        """``mark_status`` for an answer that must be terminal (ValueError otherwise)."""
        if not info.terminal:
            raise ValueError(f"batch {info.id} is {info.status}, not terminal")
        return self.mark_status(local_id, info)

    def _seen(self, record: BatchRecord, info: BatchInfo) -> BatchRecord:
        if record.state == "terminal" and not info.terminal:
            return record  # a stale answer: the provider already said it was over, and that is final
        counts = info.request_counts
        return self._move(record, "terminal" if info.terminal else "submitted", provider_id=info.id,
                          status=info.status, expires_at=info.expires_at or record.expires_at,
                          request_counts=dataclasses.asdict(counts) if counts else record.request_counts,
                          error=info.error or record.error)

    def mark_collected(self, local_id: str, *, lines: int) -> BatchRecord:
        """Every line the provider returned is on disk as a result row: the batch's rows are released."""
        return self._move(self.get(local_id), "collected", lines=lines)

    def mark_abandoned(self, local_id: str, reason: str) -> BatchRecord:
        """The provider will never answer this batch (refused, never found, gone): its rows are released.

        Never abandon a batch the provider may still run: its rows would be sent twice."""
        return self._move(self.get(local_id), "abandoned", reason=reason)

    def _move(self, record: BatchRecord, state: str, **changes: Any) -> BatchRecord:
        if state not in MOVES[record.state]:
            raise ValueError(f"batch {record.local_id} is {record.state}; it cannot become {state}")
        if record.state == state and state in ("collected", "abandoned"):
            return record  # a rerun repeating the last step
        updated = dataclasses.replace(record, state=state, updated_at=time.time(), **changes)
        self._write(updated)
        if not updated.holds_rows:
            self._ids.pop(record.local_id, None)
        return updated

    def _write(self, record: BatchRecord) -> None:
        """Durable first, then in memory: a failed write leaves both as they were."""
        if not self.writer:
            raise RuntimeError("BatchRecords(writer=False) reads only; the run holding the output lock writes")
        write_atomic(record_path(self.dir, record.local_id), record.to_json())
        self._records[record.local_id] = record
