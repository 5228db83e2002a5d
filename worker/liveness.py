"""Worker liveness: this worker's heartbeat, and taking back the jobs of workers that died or lost them.

Guarantees:
- Heartbeat: while this process runs and reaches Redis, `ragq:worker:<worker_name>:alive` exists. It is
  refreshed every `HEARTBEAT_EVERY_S` on a thread of its own with a `HEARTBEAT_TTL_S` lifetime, so no other
  duty, however slow, can let it lapse and get this worker's running jobs run again elsewhere. It lapses
  within `HEARTBEAT_TTL_S` of the process dying.
- Reaper: the jobs a dead worker held (running, or reserved and not started) are sent again within about
  `REAP_EVERY_S` of its heartbeat lapsing, by exactly one reaper (one Lua script claims the dead worker's job
  set); a job whose worker died `max_attempts` times fails with `worker_lost` instead. A job still `running`
  `OVERDUE_MARGIN_S` past the task time limit under a live worker has lost its task: it is given up and sent
  again. A re-sent job still gets one result: the job state machine refuses a claim while a live worker holds
  the job, and lets only one final transition through.
"""

from __future__ import annotations

import json
import logging
import time

import redis
from celery import Celery

from shared import redis_keys
from shared.broker import send_again
from shared.errors import NotFound
from shared.jobs import JobStatus
from shared.store import JobStore

log = logging.getLogger(__name__)

HEARTBEAT_TTL_S = 10
HEARTBEAT_EVERY_S = 2.0
# How often the reaper looks for dead workers and overdue jobs: cheap (a set read or two when none died), and
# a dead worker's jobs then wait at most about `HEARTBEAT_TTL_S` + this.
REAP_EVERY_S = 1.0
OVERDUE_MARGIN_S = 30

# Takes over the job set of a worker whose heartbeat has expired. KEYS: alive key, job set, index;
# ARGV[1] worker name. Returns the job ids, or nothing while the worker is alive or another reaper was first.
_CLAIM_DEAD_WORKER_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {} end
local jobs = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return jobs
"""

# Gives up a live worker's claim on a job it no longer runs (see `Reaper.requeue_overdue`), so the next claim
# is allowed. KEYS[1] job; ARGV[1] the worker (JSON, as stored).
_DISOWN_LUA = """
if redis.call('HGET', KEYS[1], 'status') == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'worker', 'null')
  return 1
end
return 0
"""


class Heartbeat:
    """Keeps this worker's alive key from expiring."""

    thread_name = "ragq-heartbeat"
    first_wait_s = 0.0

    def __init__(
        self, client: redis.Redis, worker_name: str, ttl_s: int = HEARTBEAT_TTL_S, every_s: float = HEARTBEAT_EVERY_S
    ) -> None:
        self.redis = client
        self.worker_name = worker_name
        self.ttl_s = ttl_s
        self.every_s = every_s

    def step(self) -> bool:
        """Say this worker process is alive; its running jobs are reclaimed once this stops."""
        self.redis.set(redis_keys.worker_alive(self.worker_name), "1", ex=self.ttl_s)
        return False


class Reaper:
    """Sends again the jobs of dead workers, and of live workers that lost them."""

    thread_name = "ragq-reaper"
    first_wait_s = 0.0

    def __init__(
        self,
        store: JobStore,
        celery: Celery,
        worker_name: str,
        max_attempts: int,
        task_time_limit_s: float = 600,
        every_s: float = REAP_EVERY_S,
    ) -> None:
        self.store = store
        self.redis = store.redis
        self.celery = celery
        self.worker_name = worker_name
        self.max_attempts = max_attempts
        self.task_time_limit_s = task_time_limit_s
        self.every_s = every_s
        self._claim_dead_worker = self.redis.register_script(_CLAIM_DEAD_WORKER_LUA)
        self._disown = self.redis.register_script(_DISOWN_LUA)

    def step(self) -> bool:
        """Reap dead workers, then re-queue overdue jobs; never asks to run again at once."""
        self.reap_dead_workers()
        self.requeue_overdue()
        return False

    def reap_dead_workers(self) -> list[str]:
        """Run again the jobs of worker processes that died (no heartbeat): the ones they were running and the
        ones whose messages they had reserved; fail those that used all their attempts.

        Celery would redeliver their messages too, but only after the visibility timeout (an hour by
        default); a job whose result is already stored by then is skipped.
        """
        requeued = []
        for name in self.redis.smembers(redis_keys.workers_with_jobs()):
            if name == self.worker_name:
                continue
            job_ids = self._claim_dead_worker(
                keys=[redis_keys.worker_alive(name), redis_keys.worker_jobs(name), redis_keys.workers_with_jobs()],
                args=[name],
            )
            for job_id in job_ids:
                try:
                    job = self.store.get(job_id)
                except NotFound:
                    continue
                # Running under this worker, or under another dead one (a re-sent job this worker reserved).
                held = job.status is JobStatus.QUEUED or (
                    job.status is JobStatus.RUNNING
                    and (job.worker in (None, name) or not self.redis.exists(redis_keys.worker_alive(job.worker)))
                )
                if not held:
                    continue
                if job.attempts >= self.max_attempts:
                    self.store.transition(
                        job_id,
                        JobStatus.FAILED,
                        finished_at=time.time(),
                        error={
                            "type": "worker_lost",
                            "message": f"the worker running this job died {job.attempts} times; not retried",
                        },
                    )
                    continue
                send_again(self.celery, self.redis, job)
                requeued.append(job_id)
            if job_ids:
                log.warning("worker %s stopped answering; re-queued %d of its jobs", name, len(requeued))
        return requeued

    def requeue_overdue(self) -> list[str]:
        """Re-queue jobs still `running` well past the task time limit under a live worker.

        A task stops waiting at the time limit and fails its job, so such a job has lost its task (a backstop:
        no known path loses one since Celery no longer cancels tasks on a broker reconnect).
        """
        cutoff = time.time() - self.task_time_limit_s - OVERDUE_MARGIN_S
        requeued = []
        for name in self.redis.smembers(redis_keys.workers_with_jobs()):
            for job_id in self.redis.smembers(redis_keys.worker_jobs(name)):
                try:
                    job = self.store.get(job_id)
                except NotFound:
                    self.redis.srem(redis_keys.worker_jobs(name), job_id)
                    continue
                if job.status is JobStatus.RUNNING and job.worker == name and (job.started_at or 0) < cutoff:
                    self.redis.srem(redis_keys.worker_jobs(name), job_id)
                    # The live worker's claim stands in the way of the next one: give it up first.
                    if not self._disown(keys=[redis_keys.job(job_id)], args=[json.dumps(name)]):
                        continue
                    send_again(self.celery, self.redis, job)
                    requeued.append(job_id)
        if requeued:
            log.warning("re-queued %d jobs running past the time limit without a task", len(requeued))
        return requeued
