"""Microbatching inside a worker process: the jobs that share one pass of the pipeline, in two stages.

Each Celery task (one per job, on a thread of the worker's thread pool) hands its question to the
`Microbatcher` and waits for the answer. Three threads keep the model from waiting for Python between
microbatches:

- the *preparer* takes the first waiting item, then whatever else arrives within `microbatch_wait_ms` (up to
  `max_microbatch_size`), and gets the microbatch ready without the model (`Stages.prepare`: statuses,
  retrieval, prompts), while the previous microbatch is still on the model;
- the *dispatcher* hands ready microbatches to the model's lane (`worker.lane`: a thread, or the engine
  process) at once, and answers the lane when it asks to start a backlog microbatch (the hand-off);
- the lane runs them on the model, interactive ones first, one after the other, and reports each result.

At most one backlog microbatch waits prepared ahead of the one on the model; interactive ones never wait for
that. Jobs keep their own task, so acknowledgement, status and result stay per job.

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
from typing import Any, Protocol

from worker.handoff import InteractiveHandoff
from worker.lane import Lane, LocalLane

log = logging.getLogger(__name__)


class Skipped:
    """The item's job was cancelled while it waited for its microbatch."""


SKIPPED = Skipped()

# Queue priorities: lower runs first.
INTERACTIVE = 0
BACKLOG = 1
_STOP = 1 << 30
# Backlog microbatches prepared ahead of the one on the model (ready here or waiting in the lane): enough
# to keep the model busy.
BACKLOG_AHEAD = 1
# While the model is busy, a microbatch short of its size keeps filling, as long as jobs keep coming: one
# arrived within the last FILL_IDLE_S. The threads freed by a microbatch fetch their next messages in a burst,
# with pauses of over 0.1 s on a busy 2-core machine; closing early costs a whole extra `generate` call, waiting
# too long at most the preparation of the last microbatch of a backlog. This often it looks again.
FILL_IDLE_S = 0.5
FILL_POLL_S = 0.005


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


class Stages(Protocol):
    """The two halves of answering a microbatch."""

    def prepare(self, items: Sequence[MicrobatchItem]) -> Any:
        """Everything before the model (runs while the previous microbatch is on it)."""
        ...

    def run(self, items: Sequence[MicrobatchItem], prepared: Any) -> Sequence[Any]:
        """The model's part: one result per item (a value, an exception, or `SKIPPED`)."""
        ...


class OneStage:
    """Stages for a function that does everything on the runner (tests, simple uses)."""

    def __init__(self, run: Callable[[Sequence[MicrobatchItem]], Sequence[Any]]) -> None:
        self._run = run

    def prepare(self, items: Sequence[MicrobatchItem]) -> None:
        return None

    def run(self, items: Sequence[MicrobatchItem], prepared: Any) -> Sequence[Any]:
        return self._run(items)


@dataclass
class _Ready:
    """A prepared microbatch, from the preparer to the lane."""

    items: list[MicrobatchItem]
    prepared: Any
    failure: BaseException | None = None

    @property
    def priority(self) -> int:
        return self.items[0].priority


class Microbatcher:
    """Collects items from many threads into microbatches, prepares the next while the current one runs."""

    def __init__(
        self,
        stages: Stages,
        max_size: int,
        wait_ms: float,
        handoff: InteractiveHandoff | None = None,
        fill_idle_s: float = FILL_IDLE_S,
        lane: Lane | None = None,
    ) -> None:
        self.stages = stages
        self.max_size = max_size
        self.wait_s = wait_ms / 1000
        self.fill_idle_s = fill_idle_s
        self.handoff = handoff or InteractiveHandoff()
        self.lane: Lane = lane or LocalLane(stages)
        # Interactive jobs first, then in arrival order: a job from the API joins the next microbatch even
        # when backlog items the worker already holds are waiting.
        self._queue: queue.PriorityQueue[tuple[int, int, MicrobatchItem | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._keys = itertools.count()
        # Everything the three threads (preparer, dispatcher, the lane's) wait on: a microbatch ready, started
        # or ended, the lane asking, an interactive item submitted, stopping.
        self._changed = threading.Condition()
        self._ready: list[_Ready] = []
        # Handed to the lane and not ended; of those, the one on the model.
        self._in_lane: dict[int, _Ready] = {}
        self._running: int | None = None
        # The backlog microbatch the lane asked to start, while unanswered.
        self._asked: int | None = None
        # Interactive items submitted and not yet in a ready microbatch: the hand-off waits for them too.
        self._interactive_pending = 0
        self._stopping = False
        self._closed = False
        self.lane.open(self)
        self._preparer = threading.Thread(target=self._prepare_loop, name="ragq-preparer", daemon=True)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="ragq-dispatcher", daemon=True)
        self._preparer.start()
        self._dispatcher.start()

    def submit(self, job_id: str, payload: Any, priority: int = INTERACTIVE) -> Future[Any]:
        """Queue `payload`; the future resolves to its result, an exception, or `SKIPPED`.

        A caller that stops waiting should cancel the future: if its microbatch has not started, it is left out.
        """
        item = MicrobatchItem(job_id, payload, priority)
        if self._closed:
            item.future.set_exception(RuntimeError("the microbatcher has stopped"))
            return item.future
        if priority == INTERACTIVE:
            with self._changed:
                self._interactive_pending += 1
        self._queue.put((priority, next(self._seq), item))
        if priority == INTERACTIVE:
            with self._changed:
                self._changed.notify_all()
        return item.future

    def stop(self) -> None:
        """Stop after the jobs already submitted; a job submitted later (or left behind) fails."""
        self._closed = True
        self._queue.put((_STOP, next(self._seq), None))
        self._preparer.join(timeout=5)
        self._dispatcher.join(timeout=5)
        self.lane.stop()
        while True:
            try:
                item = self._queue.get_nowait()[2]
            except queue.Empty:
                return
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeError("the microbatcher has stopped"))

    # -- the preparer ------------------------------------------------------------------------------------

    def _prepare_loop(self) -> None:
        while True:
            self._wait_for_room()
            collected = self._collect()
            if collected is None:
                with self._changed:
                    self._stopping = True
                    self._changed.notify_all()
                return
            # From here on a future cannot be cancelled, so setting its outcome later cannot fail.
            items = [item for item in collected if item.future.set_running_or_notify_cancel()]
            ready = _Ready(items, None)
            if items:
                try:
                    ready.prepared = self.stages.prepare(items)
                except BaseException as exc:  # the preparer thread must survive anything one microbatch does
                    log.exception("preparing a microbatch of %d failed", len(items))
                    ready.failure = exc
            with self._changed:
                if items:
                    self._ready.append(ready)
                self._interactive_pending -= sum(item.priority == INTERACTIVE for item in collected)
                self._changed.notify_all()

    def _waiting_locked(self) -> list[_Ready]:
        """Prepared microbatches not on the model yet: ready here, or waiting in the lane."""
        return self._ready + [r for key, r in self._in_lane.items() if key != self._running]

    def _wait_for_room(self) -> None:
        """Wait while enough backlog is prepared ahead, unless an interactive item is waiting to be collected."""
        with self._changed:
            while (
                sum(r.priority == BACKLOG for r in self._waiting_locked()) >= BACKLOG_AHEAD
                and not self._interactive_first()
            ):
                self._changed.wait()

    def _collect(self) -> list[MicrobatchItem] | None:
        entry = self._queue.get()
        first = entry[2]
        if first is None:
            return None
        microbatch = [first]
        deadline = first.enqueued_at + self.wait_s
        last_arrival = time.monotonic()
        while len(microbatch) < self.max_size:
            now = time.monotonic()
            timeout_s = deadline - now
            filling = False
            if timeout_s <= 0:
                # The window has closed. While the model cannot take this microbatch yet (it is busy, or
                # another one goes first) and jobs keep coming, nothing is gained by closing it: keep filling
                # it (full microbatches, fewer calls). Otherwise take only what is already waiting.
                filling = now - last_arrival < self.fill_idle_s and self._model_cannot_take(first.priority)
                timeout_s = FILL_POLL_S if filling else 0.0
            try:
                entry = self._queue.get(timeout=timeout_s)
            except queue.Empty:
                if filling or timeout_s > 0:
                    continue
                break
            # A microbatch holds one class: interactive jobs run without backlog items, so they take an
            # idle worker's time, not a full microbatch's.
            if entry[2] is None or entry[0] != first.priority:
                self._queue.put(entry)
                break
            microbatch.append(entry[2])
            last_arrival = time.monotonic()
        return microbatch

    def _model_cannot_take(self, priority: int) -> bool:
        """Whether the model is busy, or a prepared microbatch goes before one of this priority."""
        with self._changed:
            return self._running is not None or any(r.priority <= priority for r in self._waiting_locked())

    def _interactive_first(self) -> bool:
        with self._queue.mutex:
            return bool(self._queue.queue) and self._queue.queue[0][0] == INTERACTIVE

    # -- the dispatcher: hands ready microbatches to the lane, answers its asks ---------------------------

    def _dispatch_loop(self) -> None:
        while True:
            with self._changed:
                while not self._ready and not self._answerable_locked() and not (self._stopping and not self._in_lane):
                    self._changed.wait()
                if self._stopping and not self._ready and not self._in_lane:
                    return
                ready = sorted(self._ready, key=lambda r: r.priority)
                self._ready = []
                handed = []
                for r in ready:
                    if r.failure is None:
                        key = next(self._keys)
                        self._in_lane[key] = r
                        handed.append((key, r))
                asked = self._asked if self._answerable_locked() else None
            for r in ready:
                if r.failure is not None:
                    self._resolve(r, [r.failure] * len(r.items))
            for key, r in handed:
                try:
                    self.lane.submit(key, r.priority, r.items, r.prepared)
                except Exception as exc:  # the dispatcher must survive anything one microbatch does
                    log.exception("handing a microbatch of %d to the model failed", len(r.items))
                    with self._changed:
                        self._in_lane.pop(key, None)
                        self._changed.notify_all()
                    self._resolve(r, [exc] * len(r.items))
            if not ready and asked is not None:
                self._answer(asked)

    def _answerable_locked(self) -> bool:
        # While an interactive microbatch waits in the lane, the lane takes it first and asks again after.
        return self._asked is not None and not self._interactive_ready_locked()

    def _answer(self, key: int) -> None:
        """Let backlog microbatch `key` start once interactive jobs on their way have gone first."""
        self.handoff.wait_before_backlog(self._interactive_ready, self._interactive_on_its_way)
        with self._changed:
            if self._asked != key:
                return  # the lane started something else meanwhile, and will ask again
            if self._interactive_ready_locked():
                return  # one came meanwhile: it goes first, then the lane asks again
            self._asked = None
        self.lane.allow(key)

    # -- what the lane reports -------------------------------------------------------------------------------

    def started(self, key: int) -> None:
        with self._changed:
            self._running = key
            self._asked = None
            self._changed.notify_all()

    def asks(self, key: int) -> None:
        with self._changed:
            self._asked = key
            self._changed.notify_all()

    def done(self, key: int, results: Sequence[Any]) -> None:
        with self._changed:
            ready = self._in_lane.pop(key)
            if self._running == key:
                self._running = None
            self._changed.notify_all()
        self.handoff.microbatch_done(item.job_id for item in ready.items)
        self._resolve(ready, results)

    @staticmethod
    def _resolve(ready: _Ready, results: Sequence[Any]) -> None:
        if len(results) != len(ready.items):
            results = [RuntimeError(f"{len(results)} results for a microbatch of {len(ready.items)}")] * len(ready.items)
        for item, result in zip(ready.items, results, strict=True):
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _interactive_ready(self) -> bool:
        with self._changed:
            return self._interactive_ready_locked()

    def _interactive_on_its_way(self) -> bool:
        with self._changed:
            return self._interactive_pending > 0

    def _interactive_ready_locked(self) -> bool:
        return any(r.priority == INTERACTIVE for r in self._waiting_locked())
