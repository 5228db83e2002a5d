"""Microbatching inside a worker process: the jobs that share one pass of the pipeline.

Each Celery task (one per job, on a thread of the worker's thread pool) hands its question to the
`Microbatcher` and waits for the answer. The microbatcher's single thread takes the first waiting item, then
whatever else arrives within `microbatch_wait_ms` (up to `max_microbatch_size`), and runs them as one
microbatch. Jobs keep their own task, so acknowledgement, status and result stay per job.

"Batch" is the API's word (`/v1/batches`, a user's backlog file); a microbatch may mix items of several
batches, and never mixes interactive jobs with backlog items (see `worker.handoff`).
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

from worker.handoff import InteractiveHandoff

log = logging.getLogger(__name__)


class Skipped:
    """The item's job was cancelled while it waited for its microbatch."""


SKIPPED = Skipped()

# Queue priorities: lower runs first.
INTERACTIVE = 0
BACKLOG = 1
_STOP = 1 << 30


@dataclass
class MicrobatchItem:
    """One job waiting for its microbatch."""

    job_id: str
    payload: Any
    priority: int = INTERACTIVE
    enqueued_at: float = field(default_factory=time.monotonic)
    future: Future[Any] = field(default_factory=Future)


@dataclass(frozen=True)
class MicrobatchInfo:
    """What a job learns about the microbatch it ran in."""

    size: int
    wait_ms: float


RunMicrobatch = Callable[[Sequence[MicrobatchItem]], Sequence[Any]]


class Microbatcher:
    """Collects items from many threads and runs them in microbatches on one thread."""

    def __init__(
        self,
        run: RunMicrobatch,
        max_size: int,
        wait_ms: float,
        handoff: InteractiveHandoff | None = None,
    ) -> None:
        self.run = run
        self.max_size = max_size
        self.wait_s = wait_ms / 1000
        self.handoff = handoff or InteractiveHandoff()
        # Interactive jobs first, then in arrival order: a job from the API joins the next microbatch even
        # when backlog items the worker already holds are waiting.
        self._queue: queue.PriorityQueue[tuple[int, int, MicrobatchItem | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="ragq-microbatcher", daemon=True)
        self._thread.start()

    def submit(self, job_id: str, payload: Any, priority: int = INTERACTIVE) -> Future[Any]:
        """Queue `payload`; the future resolves to its result, an exception, or `SKIPPED`.

        A caller that stops waiting should cancel the future: if its microbatch has not started, it is left out.
        """
        item = MicrobatchItem(job_id, payload, priority)
        self._queue.put((priority, next(self._seq), item))
        return item.future

    def stop(self) -> None:
        """Stop after the microbatches already queued ahead of the stop."""
        self._queue.put((_STOP, next(self._seq), None))
        self._thread.join(timeout=5)

    def _collect(self) -> list[MicrobatchItem] | None:
        entry = self._queue.get()
        if entry[0] == BACKLOG:
            # Put back in its place, wait for interactive jobs on their way, then take whichever is first.
            self._queue.put(entry)
            self.handoff.wait_before_backlog(self._interactive_first)
            entry = self._queue.get()
        first = entry[2]
        if first is None:
            return None
        microbatch = [first]
        deadline = first.enqueued_at + self.wait_s
        while len(microbatch) < self.max_size:
            try:
                # Take what is already waiting at once; wait for more only until the window closes.
                entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            # A microbatch holds one class: interactive jobs run without backlog items, so they take an
            # idle worker's time, not a full microbatch's.
            if entry[2] is None or entry[0] != first.priority:
                self._queue.put(entry)
                break
            microbatch.append(entry[2])
        return microbatch

    def _interactive_first(self) -> bool:
        with self._queue.mutex:
            return bool(self._queue.queue) and self._queue.queue[0][0] == INTERACTIVE

    def _loop(self) -> None:
        while True:
            collected = self._collect()
            if collected is None:
                return
            # From here on a future cannot be cancelled, so setting its outcome below cannot fail.
            microbatch = [item for item in collected if item.future.set_running_or_notify_cancel()]
            if not microbatch:
                continue
            try:
                results = self.run(microbatch)
            except BaseException as exc:  # the microbatcher thread must survive anything one microbatch does
                log.exception("microbatch of %d failed", len(microbatch))
                results = [exc] * len(microbatch)
            self.handoff.microbatch_done(item.job_id for item in microbatch)
            for item, result in zip(microbatch, results, strict=True):
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
