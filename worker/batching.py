"""Dynamic batching inside a worker process.

Each Celery task (one per job, on a thread of the worker's thread pool) hands its question to the `Batcher`
and waits for the answer. The batcher's single thread takes the first waiting item, then whatever else
arrives within `batch_wait_ms` (up to `max_batch_size`), and runs them as one batch. Jobs keep their own
task, so acknowledgement, status and result stay per job.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class Skipped:
    """The item's job was cancelled while it waited in the batch window."""


SKIPPED = Skipped()


INTERACTIVE = 0
BACKLOG = 1


@dataclass
class BatchItem:
    """One job waiting for its batch."""

    job_id: str
    payload: Any
    priority: int = INTERACTIVE
    enqueued_at: float = field(default_factory=time.monotonic)
    future: Future[Any] = field(default_factory=Future)


@dataclass(frozen=True)
class BatchInfo:
    """What a job learns about the batch it ran in."""

    size: int
    wait_ms: float


_STOP = 1 << 30
HANDOFF_GRACE_S = 0.005
SETTLE_MAX_S = 1.0

RunBatch = Callable[[Sequence[BatchItem]], Sequence[Any]]


class Batcher:
    """Collects items from many threads and runs them in batches on one thread."""

    def __init__(
        self,
        run_batch: RunBatch,
        max_batch_size: int,
        batch_wait_ms: float,
        handoff_ms: float = 0,
        interactive_waiting: Callable[[], bool] = lambda: False,
    ) -> None:
        self.interactive_waiting = interactive_waiting
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.handoff_s = handoff_ms / 1000
        # Interactive jobs first, then in arrival order: a job from the API joins the next batch even
        # when batch items the worker already holds are waiting.
        self._queue: queue.PriorityQueue[tuple[int, int, BatchItem | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._unfinished = 0
        self._incoming = 0
        self._thread = threading.Thread(target=self._loop, name="ragq-batcher", daemon=True)
        self._thread.start()

    def submit(self, job_id: str, payload: Any, priority: int = INTERACTIVE) -> Future[Any]:
        """Queue `payload`; the future resolves to its result, an exception, or `SKIPPED`."""
        item = BatchItem(job_id, payload, priority)
        self._queue.put((priority, next(self._seq), item))
        if priority == INTERACTIVE:
            self.interactive_dropped()
        return item.future

    def stop(self) -> None:
        self._queue.put((_STOP, next(self._seq), None))
        self._thread.join(timeout=5)

    def _collect(self) -> list[BatchItem] | None:
        entry = self._queue.get()
        if entry[2] is None:
            return None
        if entry[0] == BACKLOG and self._interactive_arrives(entry):
            entry = self._queue.get()
        first = entry[2]
        assert first is not None
        batch = [first]
        deadline = first.enqueued_at + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            try:
                # Take what is already waiting at once; wait for more only until the window closes.
                entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            # A batch holds one class: interactive jobs run without backlog items, so they take an
            # idle worker's time, not a full batch's.
            if entry[2] is None or entry[0] != first.priority:
                self._queue.put(entry)
                break
            batch.append(entry[2])
        return batch

    def _interactive_arrives(self, backlog_entry: tuple[int, int, BatchItem | None]) -> bool:
        """Before a backlog batch, let interactive jobs on their way go first; True (entry put back) if one came.

        Interactive messages can only be fetched once the previous batch's threads are free again, which
        happens just after that batch ends, when backlog items the worker already held are waiting here.
        So: wait until the previous batch's tasks have returned, then, while an interactive job is still
        on its way (on the queue in Redis, or in a task that has not reached the batcher yet), wait for it.
        """
        # The previous batch's tasks only store results and return: bounded, but slow on a busy machine.
        settle_deadline = time.monotonic() + SETTLE_MAX_S
        deadline: float | None = None
        while True:
            now = time.monotonic()
            with self._queue.mutex:
                head = self._queue.queue[0] if self._queue.queue else None
            if head is not None and head[0] == INTERACTIVE:
                self._queue.put(backlog_entry)
                return True
            if self._unfinished == 0 or now > settle_deadline:
                if deadline is None:
                    deadline = now + self.handoff_s
                    settled_at = now
                on_the_way = self._incoming > 0 or self._interactive_waiting_safely()
                if now > deadline or (not on_the_way and now - settled_at >= HANDOFF_GRACE_S):
                    return False
            time.sleep(0.002)

    def _interactive_waiting_safely(self) -> bool:
        # It asks Redis; during a Redis outage the answer is "no", never an exception: an exception here
        # would end the batcher thread, and every job the worker took afterwards would time out.
        try:
            return self.interactive_waiting()
        except Exception:
            log.warning("cannot tell whether interactive jobs are waiting; not holding the backlog batch", exc_info=True)
            return False

    def expect_interactive(self) -> None:
        """An interactive job's task has started and will submit soon (or call `interactive_dropped`)."""
        with self._lock:
            self._incoming += 1

    def interactive_dropped(self) -> None:
        with self._lock:
            self._incoming = max(0, self._incoming - 1)

    def task_done(self) -> None:
        """A task of the last batch has stored its outcome (see `_interactive_arrives`)."""
        with self._lock:
            self._unfinished = max(0, self._unfinished - 1)

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            try:
                results = self.run_batch(batch)
            except BaseException as exc:  # the batcher thread must survive anything one batch does
                log.exception("batch of %d failed", len(batch))
                results = [exc] * len(batch)
            with self._lock:
                self._unfinished = len(batch)
            for item, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
