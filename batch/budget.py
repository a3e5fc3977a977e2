"""``max_cost_usd``: the cost cap, across every request of the output, crash or not.

Each request reserves its worst case before it is sent (estimated prompt
tokens x input price + max_tokens x output price). The reply's real cost
replaces the reservation, and is written to the run's spend journal
(batch/spend.py) at once, so the spend survives a kill -9: the run never
spends past the cap by more than what was in flight, counting every run of
the output.

A provider batch (batch/lanes.py) holds the worst case of all its lines, at
the batch price, from its submission until its lines are collected; so the
online lane cannot spend what the batches in flight may still be billed.
"""

from __future__ import annotations

from batch.spend import SpendJournal


class Budget:
    """Spend so far and what requests in flight have reserved; ``max_usd`` None means no cap."""

    def __init__(self, max_usd: float | None, *, spent: float = 0.0, journal: SpendJournal | None = None) -> None:
        self.max_usd = max_usd
        self.spent = spent  # earlier runs of the same output count: the cap is for the whole job
        self.reserved = 0.0
        self.journal = journal
        self._held: dict[str, float] = {}  # provider batches' reservations, by batch

    def reserve(self, amount: float) -> bool:
        if self.max_usd is None:
            return True
        if self.spent + self.reserved + amount > self.max_usd:
            return False
        self.reserved += amount
        return True

    def hold(self, key: str, amount: float, *, reserved: bool) -> None:
        """``amount`` stays reserved under ``key`` until ``settle(key)``. ``reserved``: ``reserve`` counted it
        already (this run's submission); else it is counted now, even past the cap (an earlier run's batch,
        which the provider may bill whatever the cap says)."""
        if self.max_usd is None or key in self._held:
            return
        if not reserved:
            self.reserved += amount
        self._held[key] = amount

    def settle(self, key: str) -> None:
        """The batch ``key`` holds no rows any more: its lines were billed (``bill``) or never will be."""
        self.release(self._held.pop(key, 0.0))

    def release(self, reserved: float) -> None:
        """A request ended: its reservation is replaced by what it was billed (``bill``), if anything."""
        if self.max_usd is not None:
            self.reserved -= reserved

    def bill(self, label: str, cost: float | None, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Money the provider charged (or, for a request cut off mid-flight, may have charged)."""
        if not cost:
            return
        self.spent += cost
        if self.journal is not None:
            self.journal.add(label, cost, prompt_tokens, completion_tokens)
