"""Interactive jobs before backlog items inside one worker process: the hand-off to the microbatcher.

The guarantee: **an interactive job never waits behind more than the microbatch already running.**

The broker side alone does not give it. A worker consumes its model's interactive queue before its backlog
queue, but Celery hands a thread a new message only when that thread's task returns, and a microbatch's
tasks return only after it ends. At that moment backlog items the worker already holds are waiting in the
microbatcher; started at once, they would make an interactive message that was waiting in Redis wait one
more whole microbatch. So before a backlog microbatch the microbatcher asks `InteractiveHandoff` to wait
until the previous microbatch's tasks have returned (their threads then fetch, interactive first), and then,
while an interactive job is on its way, for that job, at most `max_hold_s`. On its way means: still queued in
Redis, or its message received by this worker (Celery's `task_received`, in the consumer, the moment the
message leaves Redis) and not yet submitted to the microbatcher. Counting from the task's start instead left
a gap (the thread pool's dispatch, milliseconds on a busy machine) in which the job was in neither place.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# Longest pause of a backlog microbatch for an interactive job on its way. 100 ms was too short on a busy
# 2-core machine: the consumer, its prefetch just freed by the previous microbatch's acks, sometimes took longer
# to fetch the message, and the job then waited behind a second microbatch (test_batches, 2 runs in 5). The pause
# only happens while an interactive job is queued or received, so the model waits for work that is there.
MAX_HOLD_S = 0.3
# The previous microbatch's tasks only store results and return: bounded, but slow on a busy machine.
SETTLE_MAX_S = 1.0
# With nothing on its way, how long to look again before starting the backlog microbatch.
GRACE_S = 0.005
# How often the queue in Redis is looked at while holding (local events wake the wait at once).
POLL_S = 0.002
# A received message whose task has not submitted its job after this long is not waited for any more (its
# task never ran: refused, or the worker is stopping).
RECEIVED_TTL_S = 5.0


class InteractiveHandoff:
    """Holds a backlog microbatch back while an interactive job is on its way to the microbatcher."""

    def __init__(
        self,
        interactive_queued: Callable[[], bool] = lambda: False,
        *,
        max_hold_s: float = MAX_HOLD_S,
        settle_max_s: float = SETTLE_MAX_S,
        grace_s: float = GRACE_S,
        poll_s: float = POLL_S,
    ) -> None:
        self.interactive_queued = interactive_queued
        self.max_hold_s = max_hold_s
        self.settle_max_s = settle_max_s
        self.grace_s = grace_s
        self.poll_s = poll_s
        self._changed = threading.Condition()
        # Interactive jobs on their way to the microbatcher, with when they were received.
        self._on_the_way: dict[str, float] = {}
        self._returning: set[str] = set()

    def interactive_received(self, job_id: str) -> None:
        """This worker received the message of an interactive job: hold backlog microbatches for it."""
        with self._changed:
            self._on_the_way.setdefault(job_id, time.monotonic())

    @contextmanager
    def interactive_on_its_way(self, job_id: str) -> Iterator[None]:
        """Wrap an interactive job's task until it has submitted the job to the microbatcher (or given up)."""
        self.interactive_received(job_id)
        try:
            yield
        finally:
            with self._changed:
                self._on_the_way.pop(job_id, None)
                self._changed.notify_all()

    def microbatch_done(self, job_ids: Iterable[str]) -> None:
        """A microbatch ended: the tasks of these jobs will now store their outcomes and return.

        Only the microbatch that just ended matters: a task of an earlier one that never said it returned (it
        stopped waiting at its time limit) is forgotten here, so it cannot hold every later hand-off."""
        with self._changed:
            self._returning = set(job_ids)

    def task_returned(self, job_id: str) -> None:
        """The task of `job_id` is about to return: its thread is free for the next message."""
        with self._changed:
            self._returning.discard(job_id)
            self._changed.notify_all()

    def wait_before_backlog(
        self, interactive_ready: Callable[[], bool], interactive_submitted: Callable[[], bool] = lambda: False
    ) -> None:
        """Block until an interactive job is ready in the microbatcher, or none is on its way, or the hold ends.

        `interactive_submitted` says whether interactive jobs were submitted to the microbatcher and are not
        ready yet (being collected or prepared): they are on their way too. With nothing on its way the
        backlog microbatch goes at once, without waiting for the previous microbatch's tasks: the model does
        not idle for the hand-off unless interactive work is waiting for it.
        """
        if interactive_ready() or not (self._received_or(interactive_submitted) or self._queued_in_redis()):
            return
        now = time.monotonic()
        settle_deadline = now + self.settle_max_s
        with self._changed:
            while self._returning and now < settle_deadline and not interactive_ready():
                # Woken when a task returns; looks again every `poll_s` for an interactive job gone ready.
                self._changed.wait(min(self.poll_s, settle_deadline - now))
                now = time.monotonic()
        settled_at = now
        hold_deadline = settled_at + self.max_hold_s
        while not interactive_ready() and now <= hold_deadline:
            on_the_way = self._received_or(interactive_submitted)
            if not on_the_way and now - settled_at >= self.grace_s and not self._queued_in_redis():
                return
            with self._changed:
                self._changed.wait(self.poll_s)
            now = time.monotonic()

    def _received_or(self, interactive_submitted: Callable[[], bool]) -> bool:
        now = time.monotonic()
        with self._changed:
            received = any(now - at < RECEIVED_TTL_S for at in self._on_the_way.values())
        return received or interactive_submitted()

    def _queued_in_redis(self) -> bool:
        # During a Redis outage the answer is "no", never an exception: an exception here would end the
        # microbatcher thread, and every job the worker took afterwards would time out (found by bench.chaos).
        try:
            return self.interactive_queued()
        except Exception:
            log.warning("cannot tell whether interactive jobs are queued; not holding the backlog microbatch", exc_info=True)
            return False
