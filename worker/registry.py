"""The live worker registry: this worker's entry, and the activity counters behind the operator's picture.

Guarantees:
- While this process runs and reaches Redis, `ragq:worker:<name>:info` holds its description (model, host,
  device, dtype, microbatch caps, engine state, up since, jobs done, items/s over the last minute, last error),
  refreshed every `every_s` with a `ttl_s` lifetime (`RAGQ_WORKER_TTL_S`), and its name is in
  `ragq:workers:live`. A clean shutdown removes both at once (`deregister`); a dead worker's entry expires
  within `ttl_s`, and its name is dropped from the set by the next refresh of any live worker.
- The task threads only count in memory (`WorkerActivity`: one lock, no Redis); each refresh writes what
  they counted since the last one in one pipeline: per-model and per-batch counters per 10 s bucket, which
  expire on their own, and each failure onto its tenant's capped list of recent failures. So the hot path
  pays nothing, and every key it feeds is bounded in size and lifetime (`shared.overview`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from shared import overview, redis_keys
from shared.jobs import Job

log = logging.getLogger(__name__)

# How often the entry is refreshed at most; a short TTL (tests) refreshes more often, three times per TTL.
REFRESH_EVERY_S = 2.0
# A name stays in the live set this long past its registration's end before a live worker drops it: room for
# clocks of different hosts that disagree by a few seconds (readers trust the info key's TTL, not the score).
PRUNE_MARGIN_S = 60
# The longest error message kept (a failure's message is written by ragq, but may quote a model's output).
MAX_MESSAGE_CHARS = 500


class WorkerActivity:
    """What this worker's task threads did, counted in memory until the registry's next refresh writes it."""

    def __init__(self, model_name: str, worker_name: str) -> None:
        self.model_name = model_name
        self.worker_name = worker_name
        self.started_at = time.time()
        self.jobs_done = 0
        self.last_error: dict[str, Any] | None = None
        self._lock = threading.Lock()
        # [second, jobs ended in it] over the last minute: bounded by 60 entries however busy the worker is.
        self._ended_per_s: deque[list[int]] = deque()
        self._model_buckets: Counter[tuple[int, str]] = Counter()
        self._batch_buckets: Counter[tuple[str, int]] = Counter()
        self._failures: list[tuple[str, dict[str, Any]]] = []

    def succeeded(self, job: Job) -> None:
        """Count a job this worker answered."""
        self._ended(job, "succeeded", time.time())

    def failed(self, job: Job, error_type: str, message: str) -> None:
        """Count a job this worker failed, and remember the failure for its tenant and as this worker's last error."""
        now = time.time()
        error = {"type": error_type, "message": message[:MAX_MESSAGE_CHARS], "at": round(now, 3)}
        with self._lock:
            self.last_error = error
            self._failures.append((job.tenant, {"job_id": job.id, "batch_id": job.batch_id, **error}))
        self._ended(job, "failed", now)

    def _ended(self, job: Job, outcome: str, now: float) -> None:
        bucket = overview.bucket_of(now)
        with self._lock:
            self.jobs_done += 1
            second = int(now)
            if self._ended_per_s and self._ended_per_s[-1][0] == second:
                self._ended_per_s[-1][1] += 1
            else:
                self._ended_per_s.append([second, 1])
            self._model_buckets[(bucket, outcome)] += 1
            if job.batch_id:
                self._batch_buckets[(job.batch_id, bucket)] += 1

    def items_per_s(self, now: float) -> float:
        """Jobs this worker ended per second over the last minute (or since it started, if later)."""
        with self._lock:
            while self._ended_per_s and self._ended_per_s[0][0] < now - overview.RATE_WINDOW_S:
                self._ended_per_s.popleft()
            ended = sum(n for _, n in self._ended_per_s)
            return ended / max(1.0, min(overview.RATE_WINDOW_S, now - self.started_at))

    def write(self, pipe: Any) -> None:
        """Add what was counted since the last call to `pipe` (a Redis pipeline), and forget it here."""
        with self._lock:
            model_buckets, self._model_buckets = self._model_buckets, Counter()
            batch_buckets, self._batch_buckets = self._batch_buckets, Counter()
            failures, self._failures = self._failures, []
        for (bucket, outcome), n in model_buckets.items():
            key = redis_keys.model_finished(self.model_name, bucket)
            pipe.hincrby(key, outcome, n)
            pipe.expire(key, overview.BUCKET_TTL_S)
        for (batch_id, bucket), n in batch_buckets.items():
            key = redis_keys.batch_finished(batch_id, bucket)
            pipe.incrby(key, n)
            pipe.expire(key, overview.BATCH_BUCKET_TTL_S)
        for tenant, failure in failures:
            key = redis_keys.tenant_failures(tenant, self.model_name)
            pipe.lpush(key, json.dumps(failure))
            pipe.ltrim(key, 0, overview.MAX_RECENT_FAILURES - 1)
            pipe.expire(key, overview.FAILURES_TTL_S)


class WorkerRegistration:
    """Keeps this worker's registry entry fresh (a duty: see `worker.duties`), and writes its activity counters."""

    thread_name = "ragq-registry"
    first_wait_s = 0.0

    def __init__(
        self,
        client: redis.Redis,
        activity: WorkerActivity,
        description: dict[str, Any],
        engine_state: Callable[[], str],
        engine_restarts: Callable[[], int],
        ttl_s: int,
    ) -> None:
        self.redis = client
        self.activity = activity
        self.description = description
        self.engine_state = engine_state
        self.engine_restarts = engine_restarts
        self.ttl_s = ttl_s
        self.every_s = min(REFRESH_EVERY_S, ttl_s / 3)
        self.up_since = time.time()
        # A round in progress never brings back an entry `deregister` has removed.
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def name(self) -> str:
        return self.activity.worker_name

    def entry(self, now: float) -> dict[str, Any]:
        """This worker as the registry shows it."""
        return {
            **self.description,
            "name": self.name,
            "model": self.activity.model_name,
            "engine": self.engine_state(),
            "engine_restarts": self.engine_restarts(),
            "up_since": round(self.up_since, 3),
            "jobs_done": self.activity.jobs_done,
            "items_per_s": round(self.activity.items_per_s(now), 3),
            "last_error": self.activity.last_error,
            "refreshed_at": round(now, 3),
        }

    def step(self) -> bool:
        """Write the counters gathered since the last round, then refresh this worker's entry."""
        with self._lock:
            now = time.time()
            pipe = self.redis.pipeline(transaction=False)
            self.activity.write(pipe)
            if not self._stopped:
                pipe.set(redis_keys.worker_info(self.name), json.dumps(self.entry(now)), ex=self.ttl_s)
                pipe.zadd(redis_keys.live_workers(), {self.name: now + self.ttl_s})
                pipe.zremrangebyscore(redis_keys.live_workers(), "-inf", now - PRUNE_MARGIN_S)
                pipe.expire(redis_keys.live_workers(), self.ttl_s + PRUNE_MARGIN_S)
            pipe.execute()
        return False

    def attach(self, lane: Any, description: dict[str, Any]) -> None:
        """The model's lane is up: read the engine's state from it (an `EngineLane`'s `state` and `restarts`; a
        lane without them runs on a thread of the worker), and describe the worker as it now runs."""
        self.description = description
        self.engine_state = (lambda: lane.state) if hasattr(lane, "state") else (lambda: "thread")
        self.engine_restarts = (lambda: lane.restarts) if hasattr(lane, "restarts") else (lambda: 0)

    @contextmanager
    def while_loading(self) -> Iterator[None]:
        """Listed (engine `starting`) while the model loads, refreshed on a thread of its own until the block
        ends; the duties take over after. If loading fails, the worker leaves the registry at once."""
        stop = threading.Event()

        def refresh() -> None:
            while True:
                try:
                    self.step()
                except redis.RedisError as exc:
                    log.warning("could not refresh the worker registry: %s", exc)
                if stop.wait(self.every_s):
                    return

        thread = threading.Thread(target=refresh, name="ragq-registry-loading", daemon=True)
        thread.start()
        try:
            yield
        except BaseException:
            stop.set()
            thread.join(timeout=5)
            try:
                self.deregister()
            except redis.RedisError:
                pass
            raise
        stop.set()
        thread.join(timeout=5)

    def deregister(self) -> None:
        """Leave the registry at once (a clean shutdown), after writing the last counters."""
        with self._lock:
            self._stopped = True
            pipe = self.redis.pipeline(transaction=False)
            self.activity.write(pipe)
            pipe.delete(redis_keys.worker_info(self.name))
            pipe.zrem(redis_keys.live_workers(), self.name)
            pipe.execute()


def describe(
    device: str, dtype: str, max_batch_size: int, max_batch_tokens: int, host: str | None = None
) -> dict[str, Any]:
    """The fixed part of a worker's entry."""
    return {
        "host": host or socket.gethostname(),
        "pid": os.getpid(),
        "device": device,
        "dtype": dtype,
        "max_batch_size": max_batch_size,
        "max_batch_tokens": max_batch_tokens,
    }


def registration_for(
    client: redis.Redis,
    model_name: str,
    worker_name: str,
    ttl_s: int,
    description: dict[str, Any] | None = None,
    lane: Any = None,
) -> WorkerRegistration:
    """This worker's registration: `description` from `describe`; the engine `starting` until `lane` is given
    (here or by `attach`)."""
    description = description or describe("unknown", "unknown", 0, 0)
    registration = WorkerRegistration(
        client, WorkerActivity(model_name, worker_name), description, lambda: "starting", lambda: 0, ttl_s
    )
    if lane is not None:
        registration.attach(lane, description)
    return registration
