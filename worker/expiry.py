"""Ends the batches whose completion window has passed.

Guarantees: while any worker runs (of any model: the deadlines set is global), a batch still in progress or
cancelling past its deadline (`ragq:batches:deadlines`) ends `expired` within about `SWEEP_EVERY_S`, its pending
items are dropped and its queued and running items become `expired`, exactly once however many workers race
(the status change is one atomic script; see `BatchStore.expire_due`). An item already running may still finish
under its worker; its final transition is refused, so the batch's counts stay as expired.

Its own thread, apart from the feeder: ending a 100,000-item batch takes seconds, and feeding must not wait.
"""

from __future__ import annotations

from shared.batch_store import BatchStore

# How often the deadlines are looked at; a batch's window ends at most about this much late.
SWEEP_EVERY_S = 1.0


class Expiry:
    """Ends the batches past their completion window."""

    thread_name = "ragq-expiry"
    first_wait_s = 0.0

    def __init__(self, batches: BatchStore, every_s: float = SWEEP_EVERY_S) -> None:
        self.batches = batches
        self.every_s = every_s

    def step(self) -> bool:
        """End every batch past its window; never asks to run again at once."""
        self.batches.expire_due()
        return False
