"""``max_cost_usd``: the cost cap, across every request of the output.

Each request reserves its worst case before it is sent (estimated prompt
tokens x input price + max_tokens x output price). The reply's real cost
replaces the reservation, so the run never spends past the cap by more than
what was already in flight.
"""

from __future__ import annotations


class Budget:
    """The spend so far and what requests in flight have reserved; ``max_usd`` None means no cap."""

    def __init__(self, max_usd: float | None, *, spent: float = 0.0) -> None:
        self.max_usd = max_usd
        self.spent = spent  # earlier runs of the same output count: the cap is for the whole job
        self.reserved = 0.0

    def reserve(self, amount: float) -> bool:
        if self.max_usd is None:
            return True
        if self.spent + self.reserved + amount > self.max_usd:
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float | None) -> None:
        if self.max_usd is None:
            return
        self.reserved -= reserved
        self.spent += actual or 0.0
