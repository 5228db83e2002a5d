"""Backlog items straight from their batches: taken and claimed in one Lua call, answered by the microbatcher,
their results stored a microbatch at a time.

Interactive jobs come as Celery messages, one task each (`worker.tasks`). Batch items do not: a message per item
cost the worker's consumer most of its CPU per item (Kombu's `BRPOP`, its unacked stash and ack, the reaper's
note of the reservation; 2.7-3.0 CPU ms per item, a ceiling of about 350 items/s) and Redis 25 of its commands
per item, for nothing a batch item needs. Instead the *taker* claims up to `held_max` items at a time straight
from the model's active batches (`JobStore.claim_pending`: round-robin across batches), hands them to the
microbatcher as backlog, and the *storer* writes the outcomes of each finished microbatch in one script
(`JobStore.finish_many`).

Guarantees:
- Nothing lost: an item leaves its batch's pending list in the script that claims it for this worker (status
  `running`, in the worker's job set), so if this worker dies the reaper sends it again (`worker.liveness`),
  through Celery's batch queue, like any job of a dead worker.
- Bounded: at most `held_max` items (a few microbatches) are held at once; the rest stays in Redis for any
  worker, and a batch committed now joins the round-robin at the next take of any worker.
- One visible result per item, as for any job: the final transition refuses a job that ended meanwhile. A store
  that fails while Redis is away is retried until it succeeds, never dropped; nothing new is taken meanwhile.
- Time limit: an item not answered `task_time_limit_s` after its claim fails `timeout`, as a task's job does.
- Draining (`stop`): nothing more is taken; items not yet in a microbatch go back to the front of their batch's
  pending list (`queued` again, their attempt returned); the microbatches already prepared finish and are
  stored. No item waits for the reaper or a timeout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import redis

from shared import redis_keys
from shared.jobs import Job, JobStatus
from worker import metrics as worker_metrics
from worker.runtime import Resident
from worker.tasks import STORE_BLIPS, Final, failure, final_of, recorded, start_job, store_final

log = logging.getLogger(__name__)

# Microbatches' worth of items held at once: one on the model and one prepared behind it. When the one on the
# model ends and is stored, the next is taken and prepared while the one behind it runs. More would only hold
# items that idle workers could run: at the end of a drain a worker finishes at most one microbatch after
# the others.
HELD_MICROBATCHES = 2
# With nothing pending, look again after this long: how late a new batch can start on an idle worker.
TAKE_IDLE_S = 0.2
# After a failed take or store (Redis away), wait this long before the next try.
RETRY_PAUSE_S = 0.5
# The storer looks for items past their time limit at least this often.
SWEEP_EVERY_S = 1.0


@dataclass
class _Held:
    """A claimed item until its outcome is stored."""

    job: Job
    started_at: float
    future: Future[Any] | None
    deadline: float
    given_back: bool = False


class Backlog:
    """Takes this worker's backlog items from Redis and stores their results (see the module's guarantees)."""

    def __init__(self, resident: Resident, held_max: int, idle_s: float = TAKE_IDLE_S) -> None:
        self.resident = resident
        self.held_max = held_max
        self.idle_s = idle_s
        self._held: dict[str, _Held] = {}
        self._changed = threading.Condition()
        # Job ids whose outcome is ready, with the `Final` to store when it is not their future's.
        self._done: queue.SimpleQueue[tuple[str, Final | None]] = queue.SimpleQueue()
        self._taking = threading.Event()
        self._storing = threading.Event()
        self._taker = threading.Thread(target=self._take_loop, name="ragq-backlog-taker", daemon=True)
        self._storer = threading.Thread(target=self._store_loop, name="ragq-backlog-storer", daemon=True)

    def start(self) -> None:
        self._taking.set()
        self._storing.set()
        self._taker.start()
        self._storer.start()

    def held(self) -> int:
        with self._changed:
            return len(self._held)

    # -- taking ------------------------------------------------------------------------------------------------

    def _take_loop(self) -> None:
        while self._taking.is_set():
            with self._changed:
                while len(self._held) >= self.held_max and self._taking.is_set():
                    self._changed.wait(1.0)
                room = self.held_max - len(self._held)
            if not self._taking.is_set():
                return
            try:
                taken = self.take(room)
            except redis.RedisError as exc:
                worker_metrics.error(exc, "backlog")
                log.warning("cannot take backlog items: %s; trying again", exc)
                time.sleep(RETRY_PAUSE_S)
                continue
            except Exception:  # the taker must outlive anything one take does
                log.exception("taking backlog items failed")
                time.sleep(RETRY_PAUSE_S)
                continue
            if taken == 0:
                self._wait_for_pending()

    def _wait_for_pending(self) -> None:
        """Idle: look every `idle_s` whether the model has an active batch, with one `LLEN` (the claim script
        costs Redis and this process more), until it has or the taker stops."""
        key = redis_keys.active_batches(self.resident.model_name)
        while self._taking.is_set():
            time.sleep(self.idle_s)
            try:
                if self.resident.store.redis.llen(key):
                    return
            except redis.RedisError:
                return  # the take reports it

    def take(self, room: int) -> int:
        """Claim up to `room` items and start them; how many were claimed."""
        resident = self.resident
        started_at = time.time()
        jobs = resident.store.claim_pending(resident.model_name, room, worker=resident.worker_name, started_at=started_at)
        deadline = time.monotonic() + resident.settings.task_time_limit_s
        for job in jobs:
            held = _Held(job, started_at, None, deadline)
            with self._changed:
                self._held[job.id] = held
            started = start_job(resident, job, started_at)
            if isinstance(started, Final):
                self._done.put((job.id, started))
                continue
            held.future = started
            started.add_done_callback(lambda _, job_id=job.id: self._done.put((job_id, None)))
        return len(jobs)

    # -- storing -----------------------------------------------------------------------------------------------

    def _store_loop(self) -> None:
        while self._storing.is_set() or self.held():
            try:
                entries = [self._done.get(timeout=SWEEP_EVERY_S)]
            except queue.Empty:
                entries = []
            while True:
                try:
                    entries.append(self._done.get_nowait())
                except queue.Empty:
                    break
            entries += self._overdue()
            if entries:
                self._store(entries)
            if not self._storing.is_set() and not self._taker.is_alive() and not self.held():
                return

    def _overdue(self) -> list[tuple[str, Final | None]]:
        """Items past their time limit: left out of their microbatch if it has not started, failed `timeout`."""
        now = time.monotonic()
        limit_s = self.resident.settings.task_time_limit_s
        with self._changed:
            late = [h for h in self._held.values() if h.deadline < now and not h.given_back]
        entries: list[tuple[str, Final | None]] = []
        for held in late:
            held.deadline = float("inf")  # once
            if held.future is not None:
                held.future.cancel()
            entries.append((held.job.id, failure(self.resident, held.job, held.started_at, "timeout", f"job ran longer than {limit_s} s")))
        return entries

    def _store(self, entries: list[tuple[str, Final | None]]) -> None:
        finals: list[tuple[_Held, Final]] = []
        ended: list[str] = []
        for job_id, given in entries:
            with self._changed:
                held = self._held.get(job_id)
            if held is None or held.given_back:
                continue  # stored already (it timed out, then its microbatch ended), or given back
            final = given
            if final is None:
                future = held.future
                if future is None or future.cancelled():
                    continue  # cancelled for its time limit (stored with that entry) or for giving back
                exc = future.exception()
                final = final_of(self.resident, held.job, held.started_at, exc if exc is not None else future.result())
            if final is None:
                ended.append(job_id)  # cancelled while it waited: nothing to store
            else:
                finals.append((held, final))
        outcomes = self._finish(finals) if finals else []
        for (held, final), outcome in zip(finals, outcomes, strict=True):
            if not outcome.applied and outcome.previous is JobStatus.QUEUED:
                # Redis lost this worker's claim (a crash inside its fsync window): claim again and store alone.
                store_final(self.resident, held.job, final)
            else:
                recorded(self.resident, held.job, final, outcome)
            ended.append(held.job.id)
        with self._changed:
            for job_id in ended:
                self._held.pop(job_id, None)
            self._changed.notify_all()

    def _finish(self, finals: list[tuple[_Held, Final]]) -> list[Any]:
        """Store the finals in one round trip, waiting out a Redis outage: a computed answer is never dropped."""
        while True:
            try:
                return self.resident.store.finish_many([(h.job.id, f.status, f.fields) for h, f in finals])
            except STORE_BLIPS as exc:
                worker_metrics.error(exc, "store")
                log.warning("cannot store %d backlog results: %s; trying again", len(finals), exc)
                time.sleep(RETRY_PAUSE_S)

    # -- stopping ----------------------------------------------------------------------------------------------

    def stop_taking(self) -> None:
        """Take nothing more (a warm shutdown has begun)."""
        self._taking.clear()
        with self._changed:
            self._changed.notify_all()

    def stop(self, timeout_s: float) -> None:
        """Drain: take nothing more, give back what has not started, store what finishes within `timeout_s`."""
        self.stop_taking()
        if self._taker.is_alive():
            self._taker.join(timeout=timeout_s)
        self._give_back_unstarted()
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._held and time.monotonic() < deadline:
                self._changed.wait(min(1.0, max(0.01, deadline - time.monotonic())))
            left = len(self._held)
        self._storing.clear()
        if self._storer.is_alive():
            self._storer.join(timeout=SWEEP_EVERY_S * 2)
        if left:
            log.warning("stopped with %d backlog items unfinished; the reaper sends them again", left)

    def _give_back_unstarted(self) -> None:
        with self._changed:
            unstarted = [h for h in self._held.values() if h.future is not None and h.future.cancel()]
            for held in unstarted:
                held.given_back = True
        if not unstarted:
            return
        ids = [h.job.id for h in unstarted]
        try:
            given = self.resident.store.give_back(ids, self.resident.worker_name, self.resident.model_name)
        except redis.RedisError as exc:
            # They stay claimed by this worker: the reaper sends them again once its heartbeat lapses.
            log.warning("could not give back %d backlog items: %s", len(ids), exc)
        else:
            log.info("gave back %d backlog items not started", given)
        with self._changed:
            for job_id in ids:
                self._held.pop(job_id, None)
            self._changed.notify_all()


_backlog: Backlog | None = None


def start(resident: Resident) -> Backlog:
    """Start taking this worker's backlog items (once per process)."""
    global _backlog
    if _backlog is None:
        _backlog = Backlog(resident, HELD_MICROBATCHES * resident.microbatcher.max_size)
        _backlog.start()
    return _backlog


def stop_taking() -> None:
    if _backlog is not None:
        _backlog.stop_taking()


def stop(timeout_s: float) -> None:
    if _backlog is not None:
        _backlog.stop(timeout_s)
