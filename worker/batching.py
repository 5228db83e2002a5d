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

RunBatch = Callable[[Sequence[BatchItem]], Sequence[Any]]


class Batcher:
    """Collects items from many threads and runs them in batches on one thread."""

    def __init__(self, run_batch: RunBatch, max_batch_size: int, batch_wait_ms: float) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        # Interactive jobs first, then in arrival order: a job from the API joins the next batch even
        # when batch items the worker already holds are waiting.
        self._queue: queue.PriorityQueue[tuple[int, int, BatchItem | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="ragq-batcher", daemon=True)
        self._thread.start()

    def submit(self, job_id: str, payload: Any, priority: int = INTERACTIVE) -> Future[Any]:
        """Queue `payload`; the future resolves to its result, an exception, or `SKIPPED`."""
        item = BatchItem(job_id, payload, priority)
        self._queue.put((priority, next(self._seq), item))
        return item.future

    def stop(self) -> None:
        self._queue.put((_STOP, next(self._seq), None))
        self._thread.join(timeout=5)

    def _collect(self) -> list[BatchItem] | None:
        first = self._queue.get()[2]
        if first is None:
            return None
        batch = [first]
        deadline = first.enqueued_at + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            try:
                # Take what is already waiting at once; wait for more only until the window closes.
                entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if entry[2] is None:
                self._queue.put(entry)
                break
            batch.append(entry[2])
        return batch

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
            for item, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
