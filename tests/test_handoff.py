"""The interactive-before-backlog guarantee inside one worker, on real threads shaped like Celery's pool.

A simulated broker hands messages to a pool of threads, interactive first, and a thread takes its next
message only once its task has returned: the two properties of a Celery thread pool with prefetch 1 and
Kombu's priority queue order that make the hand-off necessary. Like Celery's consumer, the simulation reports
an interactive message as received the moment it leaves the broker, and the task body starts a little later
(the pool's dispatch).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import pytest

from worker.handoff import InteractiveHandoff
from worker.microbatcher import BACKLOG, INTERACTIVE, Microbatcher, MicrobatchItem, OneStage

MAX_SIZE = 4
RUN_S = 0.05
CLAIM_S = 0.002
STORE_S = 0.005
# Between the consumer receiving a message and a pool thread running its task: longer than the hold's grace.
DISPATCH_S = 0.01


class Worker:
    """A microbatcher fed by 2 x MAX_SIZE task threads from a two-queue broker."""

    def __init__(self, backlog: int, inject_at: set[int], report_receipt: bool = True, **hold: float) -> None:
        self.report_receipt = report_receipt
        self.interactive: deque[str] = deque()
        self.backlog: deque[str] = deque(f"b{i}" for i in range(backlog))
        self.lock = threading.Lock()
        self.started: list[list[str]] = []
        self.injected: dict[int, str] = {}
        self.inject_at = inject_at
        self.handoff = InteractiveHandoff(lambda: bool(self.interactive), **hold)
        self.microbatcher = Microbatcher(OneStage(self.run), MAX_SIZE, wait_ms=0, handoff=self.handoff)
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.task_thread, daemon=True) for _ in range(2 * MAX_SIZE)]

    def run(self, items: Sequence[MicrobatchItem]) -> list[Any]:
        number = len(self.started)
        self.started.append([item.job_id for item in items])
        time.sleep(RUN_S / 2)
        if number in self.inject_at:
            # An interactive job reaches the broker while this microbatch runs, after the threads that were
            # free have taken backlog messages: every thread is busy until this microbatch ends.
            job_id = f"i{number}"
            self.injected[number] = job_id
            with self.lock:
                self.interactive.append(job_id)
        time.sleep(RUN_S / 2)
        return [None] * len(items)

    def take(self) -> tuple[str, bool] | None:
        with self.lock:
            if self.interactive:
                return self.interactive.popleft(), True
            if self.backlog:
                return self.backlog.popleft(), False
        return None

    def task_thread(self) -> None:
        while not self.stopping.is_set():
            message = self.take()
            if message is None:
                time.sleep(0.001)
                continue
            job_id, interactive = message
            if interactive and self.report_receipt:
                self.handoff.interactive_received(job_id)
            time.sleep(DISPATCH_S)
            try:
                if interactive:
                    with self.handoff.interactive_on_its_way(job_id):
                        time.sleep(CLAIM_S)
                        future = self.microbatcher.submit(job_id, None, INTERACTIVE)
                else:
                    time.sleep(CLAIM_S)
                    future = self.microbatcher.submit(job_id, None, BACKLOG)
                future.result(timeout=30)
                time.sleep(STORE_S)
            finally:
                self.handoff.task_returned(job_id)

    def run_until(self, microbatches: int) -> None:
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(self.started) < microbatches and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=5)
        self.microbatcher.stop()


@pytest.mark.parametrize("inject_at", [{3}, {4, 9, 14}])
def test_an_interactive_job_never_waits_behind_more_than_the_running_microbatch(inject_at: set[int]) -> None:
    worker = Worker(backlog=400, inject_at=inject_at)
    worker.run_until(max(inject_at) + 4)
    for number, job_id in worker.injected.items():
        # It arrived while microbatch `number` ran: the next one to start is its own, with no backlog item.
        assert worker.started[number + 1] == [job_id], worker.started[number : number + 3]
    assert len(worker.injected) == len(inject_at)


@pytest.mark.parametrize(
    "how",
    [
        # The threads of the running microbatch's jobs are busy, the other threads' backlog items wait in the
        # microbatcher: without the hold they run before the interactive job.
        {"max_hold_s": 0, "settle_max_s": 0, "grace_s": 0},
        # Counting the job as on its way only once its task starts: the pool's dispatch outlasts the grace.
        {"report_receipt": False},
    ],
    ids=["no hold", "task start only"],
)
def test_the_controls_break_the_guarantee(how: dict[str, Any]) -> None:
    worker = Worker(backlog=400, inject_at={3}, **how)
    worker.run_until(8)
    assert worker.started[4] != ["i3"]
    assert "i3" in [job for microbatch in worker.started[5:8] for job in microbatch]


def test_a_backlog_microbatch_waits_at_most_the_hold_for_a_job_that_never_comes() -> None:
    # An interactive message said to be queued in Redis forever (another worker takes it, say).
    handoff = InteractiveHandoff(lambda: True, max_hold_s=0.1)
    started = time.monotonic()
    handoff.wait_before_backlog(lambda: False)
    assert 0.1 <= time.monotonic() - started < 1.0
