"""Report, stage 2a: Arrow tables -> numpy columns that aggregate fast.

A million attempts are counted with ``np.bincount`` over integer codes, never
per row in Python: each repeated string column (model, outcome, lane, ...)
becomes codes plus one label per code; numbers become float or int arrays
with nulls made explicit (NaN, 0 or a mask, whichever the sum needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from batch.report_read import model_key

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Category:
    """A string column as codes: ``labels[codes[i]]`` is row i's value (None for null)."""

    codes: Ints
    labels: list[str | None]

    @classmethod
    def of(cls, column: pa.ChunkedArray) -> Category:
        if not pa.types.is_dictionary(column.type):
            column = column.dictionary_encode()
        # Parts carry their own dictionaries; one shared dictionary makes codes comparable across parts.
        unified = pa.table({"c": column}).unify_dictionaries()["c"]
        if unified.num_chunks == 0:
            return cls(np.zeros(0, np.int64), [None])
        combined = unified.combine_chunks() if unified.num_chunks > 1 else unified.chunk(0)
        labels: list[str | None] = [*combined.dictionary.to_pylist(), None]
        codes = pc.fill_null(combined.indices, len(labels) - 1).to_numpy(zero_copy_only=False)
        return cls(codes.astype(np.int64, copy=False), labels)

    @classmethod
    def of_models(cls, provider: Category, model: Category) -> Category:
        """One code per (provider, model) pair, labelled ``PROVIDER:MODEL``."""
        pair = provider.codes * len(model.labels) + model.codes
        uniq, inverse = np.unique(pair, return_inverse=True)
        labels: list[str | None] = [model_key(provider.labels[u // len(model.labels)],
                                              model.labels[u % len(model.labels)]) for u in uniq.tolist()]
        return cls(inverse.astype(np.int64).reshape(-1), labels)

    def mask(self, *values: str | None) -> Bools:
        wanted = [i for i, label in enumerate(self.labels) if label in values]
        return np.isin(self.codes, wanted)

    def count(self, where: Bools | None = None) -> dict[str, int]:
        """Rows per value (where ``where``), zero counts left out; null shows as ``"(none)"``."""
        codes = self.codes if where is None else self.codes[where]
        counts = np.bincount(codes, minlength=len(self.labels))
        return {_label(self.labels[i]): int(c) for i, c in enumerate(counts.tolist()) if c}

    def sum(self, values: Floats, where: Bools | None = None) -> dict[str, float]:
        codes, weights = (self.codes, values) if where is None else (self.codes[where], values[where])
        sums = np.bincount(codes, weights=weights, minlength=len(self.labels))
        present = np.bincount(codes, minlength=len(self.labels))
        return {_label(self.labels[i]): float(s) for i, s in enumerate(sums.tolist()) if present[i]}


def _label(value: str | None) -> str:
    return "(none)" if value is None else value


def floats(column: pa.ChunkedArray, null: float = np.nan) -> Floats:
    filled = pc.fill_null(column.cast(pa.float64()), null)
    return np.asarray(filled.to_numpy(), dtype=np.float64)


def ints(column: pa.ChunkedArray, null: int = 0) -> Ints:
    filled = pc.fill_null(column.cast(pa.int64()), null)
    return np.asarray(filled.to_numpy(), dtype=np.int64)


@dataclass(frozen=True, slots=True)
class Attempts:
    """The attempt log as columns; one entry per attempt."""

    n: int
    ids: pa.ChunkedArray
    run: Category
    lane: Category
    model: Category  # PROVIDER:MODEL
    outcome: Category
    then: Category
    message: Category
    level: Ints  # -1 when unknown
    started_us: Ints  # microseconds since the epoch; look at ``timed`` first
    timed: Bools
    latency_ms: Floats  # NaN when unknown
    cost_usd: Floats  # 0 when not billed
    prompt_tokens: Ints
    completion_tokens: Ints

    @classmethod
    def of(cls, table: pa.Table) -> Attempts:
        started = table["started"].cast(pa.int64())
        return cls(
            n=table.num_rows, ids=table["id"], run=Category.of(table["run_id"]), lane=Category.of(table["lane"]),
            model=Category.of_models(Category.of(table["provider"]), Category.of(table["model"])),
            outcome=Category.of(table["outcome"]), then=Category.of(table["then"]),
            message=Category.of(table["error_message"]), level=ints(table["level"], -1),
            started_us=ints(started, 0), timed=~np.asarray(started.is_null().to_numpy(zero_copy_only=False), bool),
            latency_ms=floats(table["latency_ms"]), cost_usd=floats(table["cost_usd"], 0.0),
            prompt_tokens=ints(table["prompt_tokens"]), completion_tokens=ints(table["completion_tokens"]),
        )

    @property
    def arrivals_down_chain(self) -> Bools:
        """A row's first attempt (per run) at a model down its chain: a fallback, whether the model above
        failed it or was skipped (breaker open, gone) without an attempt. A cache hit there is not one."""
        sent = (self.level > 0) & ~self.lane.mask("cache")
        first = np.zeros(self.n, bool)
        if sent.any():
            index = np.flatnonzero(sent)
            ids = Category.of(self.ids.take(index)).codes
            triples = np.stack([self.run.codes[index], ids, self.model.codes[index]], axis=1)
            first[index[np.unique(triples, axis=0, return_index=True)[1]]] = True
        return first

    @property
    def failed(self) -> Bools:
        """Attempts that did not give an accepted answer and were not a 429 (those are counted apart)."""
        return ~self.outcome.mask("ok", "rate_limited", None)


@dataclass(frozen=True, slots=True)
class Results:
    """The results as columns; one entry per row. Rows without a lane are ``online``."""

    n: int
    ids: pa.ChunkedArray
    status: Category
    lane: Category
    model: Category
    error_type: Category
    message: Category
    cached: Bools
    latency_ms: Floats
    cost_usd: Floats
    prompt_tokens: Ints
    completion_tokens: Ints

    @classmethod
    def of(cls, table: pa.Table) -> Results:
        lane = pc.fill_null(table["lane"].cast(pa.string()), "online")
        return cls(
            n=table.num_rows, ids=table["id"], status=Category.of(table["status"]), lane=Category.of(lane),
            model=Category.of_models(Category.of(table["provider"]), Category.of(table["model"])),
            error_type=Category.of(table["error_type"]), message=Category.of(table["error_message"]),
            cached=np.asarray(pc.fill_null(table["cached"], False).to_numpy(zero_copy_only=False), bool),
            latency_ms=floats(table["latency_ms"]), cost_usd=floats(table["cost_usd"], 0.0),
            prompt_tokens=ints(table["prompt_tokens"]), completion_tokens=ints(table["completion_tokens"]),
        )
