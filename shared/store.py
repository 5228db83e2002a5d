"""Job records in Redis: create, read, move through the state machine atomically, wait for the end."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from shared import keys
from shared.errors import NotFound
from shared.jobs import Job, JobStatus, allowed_sources

# One round trip that checks the current status against the allowed sources and writes the new
# status and fields only if it may: a cancel racing a worker, or two workers racing each other,
# can never both succeed in making a final transition.
_TRANSITION_LUA = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, ''} end
local n = tonumber(ARGV[3])
local allowed = false
for i = 4, 3 + n do
  if ARGV[i] == current then allowed = true end
end
if not allowed then return {0, current} end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 4 + n, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[1] == 'running' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
redis.call('PUBLISH', KEYS[2], ARGV[1])
return {1, current}
"""


@dataclass(frozen=True)
class Transition:
    """Outcome of a transition attempt: whether it happened, and the status found before it."""

    applied: bool
    previous: JobStatus | None


def connect(url: str, threads: int = 8) -> redis.Redis:
    """A Redis client for `threads` concurrent users that fails fast when Redis is down (so the API answers 503).

    Each long-poll holds a pub/sub connection while it waits and needs another to read the job, so the pool
    allows two per thread; past that, a request waits briefly for a free connection instead of failing.
    """
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=2 * threads + 8,
        timeout=10,
        decode_responses=True,
        socket_connect_timeout=3,
        socket_timeout=10,
        health_check_interval=30,
    )
    return redis.Redis(connection_pool=pool)


class JobStore:
    """All reads and writes of job records."""

    def __init__(self, client: redis.Redis, result_ttl_s: int) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self._transition = client.register_script(_TRANSITION_LUA)

    def create(self, job: Job) -> None:
        """Store a new queued job (no TTL until it finishes)."""
        self.redis.hset(keys.job(job.id), mapping=job.to_redis())

    def delete(self, job_id: str) -> None:
        """Remove a job record (used to undo a submission whose enqueue failed)."""
        self.redis.delete(keys.job(job_id))

    def get(self, job_id: str) -> Job:
        """The job, or `NotFound`."""
        fields = self.redis.hgetall(keys.job(job_id))
        if not fields:
            raise NotFound(f"no job with id {job_id!r}")
        return Job.from_redis(fields)

    def statuses(self, job_ids: list[str]) -> list[JobStatus | None]:
        """Current status of each job (None where it does not exist), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "status")
        return [JobStatus(s) if s else None for s in pipe.execute()]

    def transition(self, job_id: str, target: JobStatus, **fields: Any) -> Transition:
        """Move the job to `target` if the state machine allows it, writing `fields` with it."""
        sources = [s.value for s in allowed_sources(target)]
        ttl = self.result_ttl_s if target.is_final else 0
        args: list[str | int] = [target.value, ttl, len(sources), *sources]
        for name, value in fields.items():
            args += [name, json.dumps(value)]
        applied, previous = self._transition(keys=[keys.job(job_id), keys.job_events(job_id)], args=args)
        return Transition(bool(applied), JobStatus(previous) if previous else None)

    def wait_until_final(self, job_id: str, timeout_s: float) -> Job:
        """The job once it is final, or its current state after `timeout_s`; blocks on pub/sub, never polls."""
        job = self.get(job_id)
        if job.status.is_final or timeout_s <= 0:
            return job
        deadline = time.monotonic() + timeout_s
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(keys.job_events(job_id))
            # Read again after subscribing: a change between the first read and the subscription
            # published before anyone listened.
            job = self.get(job_id)
            while not job.status.is_final:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if pubsub.get_message(timeout=remaining) is not None:
                    job = self.get(job_id)
            return job
        finally:
            pubsub.close()


def announce_worker(client: redis.Redis, worker_id: str, model_name: str) -> None:
    """Record that a worker process has loaded `model_name` and serves it."""
    entry = {"model": model_name, "ready_at": time.time()}
    client.hset(keys.workers(), worker_id, json.dumps(entry))


def ready_workers(client: redis.Redis, since: float, model_name: str | None = None) -> int:
    """How many worker processes announced readiness after `since` (for `model_name`, if given)."""
    count = 0
    for raw in client.hvals(keys.workers()):
        entry = json.loads(raw)
        if entry["ready_at"] >= since and model_name in (None, entry["model"]):
            count += 1
    return count
