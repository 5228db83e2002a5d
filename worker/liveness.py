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
- Cost: housekeeping load on Redis per worker stays constant as workers are added. Every reaper asks for the
  turn each period (one `SET NX`); only the one that gets it looks for dead workers (one script over the
  worker names), and only the one that gets the longer overdue turn (every `OVERDUE_EVERY_S`) reads the job
  sets, in two pipelined round trips. Before, every worker read every job of every worker every second: a
  load growing with the square of the number of workers.
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
# The overdue backstop looks for jobs `OVERDUE_MARGIN_S` past a time limit of minutes: a look every 10 s is
# as good as one every second, at a tenth of the reads.
OVERDUE_EVERY_S = 10.0

# The names in the set of workers with jobs whose heartbeat is gone, in one round trip. KEYS[1] that set;
# ARGV[1] the heartbeat key with `{id}` for the name; ARGV[2] the asking worker's name (never dead to itself).
_DEAD_WORKERS_LUA = """
local dead = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if name ~= ARGV[2] and redis.call('EXISTS', (string.gsub(ARGV[1], '{id}', name))) == 0 then
    table.insert(dead, name)
  end
end
return dead
"""

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
        self._dead_workers = self.redis.register_script(_DEAD_WORKERS_LUA)

    def step(self) -> bool:
        """If this worker has the period's turn: reap dead workers, and re-queue overdue jobs if it also has the
        overdue turn. Never asks to run again at once."""
        if self._take_turn(redis_keys.reaper_turn(), self.every_s):
            self.reap_dead_workers()
            if self._take_turn(redis_keys.overdue_turn(), OVERDUE_EVERY_S):
                self.requeue_overdue()
        return False

    def _take_turn(self, key: str, period_s: float) -> bool:
        """Whether this worker is the one to act in the current period: the first to ask after the last turn
        expired. A turn holder that dies only skips its period; the next one is taken by another."""
        # A little under the period, so that the holder's own next ask (one period later) finds the key gone.
        return bool(self.redis.set(key, self.worker_name, nx=True, px=max(1, int(period_s * 900))))

    def reap_dead_workers(self) -> list[str]:
        """Run again the jobs of worker processes that died (no heartbeat): the ones they were running and the
        ones whose messages they had reserved; fail those that used all their attempts.

        Celery would redeliver their messages too, but only after the visibility timeout (an hour by
        default); a job whose result is already stored by then is skipped.
        """
        requeued = []
        dead = self._dead_workers(keys=[redis_keys.workers_with_jobs()], args=[redis_keys.worker_alive("{id}"), self.worker_name])
        for name in dead:
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
        names = sorted(self.redis.smembers(redis_keys.workers_with_jobs()))
        # Two pipelined round trips whatever the number of workers and jobs: the job sets, then each job's
        # status, holder and start.
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.smembers(redis_keys.worker_jobs(name))
        held = [(name, job_id) for name, job_ids in zip(names, pipe.execute(), strict=True) for job_id in job_ids]
        pipe = self.redis.pipeline(transaction=False)
        for _, job_id in held:
            pipe.hmget(redis_keys.job(job_id), "status", "worker", "started_at")
        requeued = []
        for (name, job_id), (status, worker, started_at) in zip(held, pipe.execute(), strict=True):
            if status is None:
                self.redis.srem(redis_keys.worker_jobs(name), job_id)
                continue
            overdue = status == JobStatus.RUNNING.value and float(json.loads(started_at or "0") or 0) < cutoff
            if not (overdue and json.loads(worker or "null") == name):
                continue
            self.redis.srem(redis_keys.worker_jobs(name), job_id)
            # The live worker's claim stands in the way of the next one: give it up first.
            if not self._disown(keys=[redis_keys.job(job_id)], args=[json.dumps(name)]):
                continue
            try:
                job = self.store.get(job_id)
            except NotFound:
                continue
            send_again(self.celery, self.redis, job)
            requeued.append(job_id)
        if requeued:
            log.warning("re-queued %d jobs running past the time limit without a task", len(requeued))
        return requeued
