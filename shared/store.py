"""Job records in Redis: create, read, move through the state machine atomically, wait for the end.

Every status change of a job runs in one Lua script that also moves the counts of the job's batch, if it
has one, and ends the batch when its last item ends; so a batch's counts add up at every observation. The
scripts compute batch keys from templates built by `shared.keys` (single-node Redis; not cluster-safe).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from shared import redis_keys
from shared.lua import with_now
from shared.usage import RECORD_USAGE_LUA
from shared.errors import NotFound
from shared.api_keys import LOCAL_TENANT
from shared.jobs import Job, JobStatus, allowed_sources
# The one client factory lives with the URL forms it understands; re-exported here, where callers always found it.
from shared.redis_client import connect as connect  # noqa: F401

TEMPLATES = json.dumps(
    {
        "batch": redis_keys.batch("{id}"),
        "counts": redis_keys.batch_counts("{id}"),
        "jobs": redis_keys.batch_jobs("{id}"),
        "events": redis_keys.batch_events("{id}"),
        "callbacks": redis_keys.callbacks(),
        "deadlines": redis_keys.batch_deadlines(),
        "worker_jobs": redis_keys.worker_jobs("{id}"),
        "with_jobs": redis_keys.workers_with_jobs(),
        "sent": redis_keys.sent("{id}"),
        "worker_alive": redis_keys.worker_alive("{id}"),
        "outstanding": redis_keys.tenant_outstanding("{id}"),
        "local_tenant": LOCAL_TENANT,
    }
)

# A library of Lua functions, prepended to each script below.
_LUA_LIB = with_now(RECORD_USAGE_LUA + """
local T = cjson.decode(ARGV[1])
local RESULT_TTL = tonumber(ARGV[2])
local function key(name, id) return (string.gsub(T[name], '{id}', id)) end
local FINAL = {succeeded = true, failed = true, cancelled = true, expired = true}

-- What a cancelled batch and its items keep instead of the result TTL (set at its commit).
local function ended_ttl(bkey)
  local short = tonumber(redis.call('HGET', bkey, 'ended_ttl_s') or '')
  if short and short < RESULT_TTL then return short end
  return RESULT_TTL
end

local function finish_batch(batch_id)
  local bkey = key('batch', batch_id)
  if redis.call('HSETNX', bkey, 'finalized', '1') == 0 then return end
  local status = redis.call('HGET', bkey, 'status')
  local t = now()
  if status == 'in_progress' then
    redis.call('HSET', bkey, 'status', 'completed', 'completed_at', t)
  elseif status == 'cancelling' then
    redis.call('HSET', bkey, 'status', 'cancelled', 'cancelled_at', t)
  end
  redis.call('ZREM', T['deadlines'], batch_id)
  local callback = redis.call('HGET', bkey, 'callback_url')
  if callback and callback ~= 'null' then redis.call('ZADD', T['callbacks'], t, batch_id) end
  for _, name in ipairs({'batch', 'counts', 'jobs'}) do
    redis.call('EXPIRE', key(name, batch_id), status == 'cancelling' and ended_ttl(bkey) or RESULT_TTL)
  end
  redis.call('PUBLISH', key('events', batch_id), redis.call('HGET', bkey, 'status'))
end

local TRACKED = {worker = true, model = true, tenant = true, batch_id = true, usage = true}

local function transition(job_key, target, allowed, fields)
  -- One read of every field the transition looks at, one write of the status with the fields: a transition
  -- is the bulk of the Redis commands of a job (see docs/capacity.md).
  local before = redis.call('HMGET', job_key, 'status', 'worker', 'id', 'model', 'tenant', 'batch_id')
  local current = before[1]
  if not current then return {0, ''} end
  if not allowed[current] then return {0, current} end
  local previous_worker = cjson.decode(before[2] or 'null')
  if current == 'running' and target == 'running' then
    -- A second message for a running job (a redelivery, a re-send) may take it over only from a worker
    -- that is gone; a live worker keeps it and the duplicate is skipped.
    if previous_worker ~= cjson.null and redis.call('EXISTS', key('worker_alive', previous_worker)) == 1 then return {0, current} end
  end
  local id = before[3] and cjson.decode(before[3]) or job_key
  -- Track which worker runs the job, so the jobs of a worker that died can be found and run again.
  if current == 'running' and previous_worker ~= cjson.null then
    redis.call('SREM', key('worker_jobs', previous_worker), id)
  end
  -- The fields read below, as this transition leaves them.
  local after = {worker = before[2], model = before[4], tenant = before[5], batch_id = before[6]}
  local writes = {'status', target}
  for i = 1, #fields, 2 do
    table.insert(writes, fields[i])
    table.insert(writes, fields[i + 1])
    if TRACKED[fields[i]] then after[fields[i]] = fields[i + 1] end
  end
  redis.call('HSET', job_key, unpack(writes))
  -- Its message has been taken (or no longer matters): the message audit stops watching it.
  if after.model then redis.call('ZREM', key('sent', cjson.decode(after.model)), id) end
  if target == 'running' then
    redis.call('HINCRBY', job_key, 'attempts', 1)
    local worker = cjson.decode(after.worker or 'null')
    if worker ~= cjson.null then
      redis.call('SADD', key('worker_jobs', worker), id)
      redis.call('SADD', T['with_jobs'], worker)
    end
  end
  if FINAL[target] then redis.call('EXPIRE', job_key, RESULT_TTL) end
  if FINAL[target] and not FINAL[current] then
    -- The job no longer counts against its tenant's quota of outstanding jobs.
    local tenant = after.tenant and cjson.decode(after.tenant) or T['local_tenant']
    if redis.call('DECR', key('outstanding', tenant)) <= 0 then redis.call('DEL', key('outstanding', tenant)) end
  end
  -- Usage per tenant (shared/usage.py) moves with the result that records it: counted once, never lost.
  if target == 'succeeded' and current ~= target then record_usage(after.tenant, after.model, after.usage) end
  redis.call('PUBLISH', job_key .. ':events', target)
  local batch = after.batch_id
  if batch and current ~= target then
    batch = cjson.decode(batch)
    if batch ~= cjson.null then
      local counts = key('counts', batch)
      redis.call('HINCRBY', counts, current, -1)
      redis.call('HINCRBY', counts, target, 1)
      if FINAL[target] then
        local left = redis.call('HMGET', counts, 'queued', 'running', 'cancelled')
        -- An item that was running when its batch was cancelled keeps no more than the batch's other items.
        -- (Looked up only once something in the batch was cancelled: most final transitions pay nothing.)
        if tonumber(left[3] or 0) > 0 and redis.call('HGET', key('batch', batch), 'status') == 'cancelling' then
          redis.call('EXPIRE', job_key, ended_ttl(key('batch', batch)))
        end
        if tonumber(left[1] or 0) + tonumber(left[2] or 0) == 0 then finish_batch(batch) end
      end
    end
  end
  return {1, current}
end

local function set_of(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = true end
  return s
end
""")

# KEYS[1] job; ARGV: templates, result ttl, target, allowed (JSON list), fields (JSON list of name, value).
_TRANSITION_LUA = _LUA_LIB + """
return transition(KEYS[1], ARGV[3], set_of(cjson.decode(ARGV[4])), cjson.decode(ARGV[5]))
"""

# KEYS[1] job; ARGV as above. The transition, then the job's fields if it applied: a claim and its read in one
# round trip.
_CLAIM_LUA = _LUA_LIB + """
local outcome = transition(KEYS[1], ARGV[3], set_of(cjson.decode(ARGV[4])), cjson.decode(ARGV[5]))
if outcome[1] == 1 then table.insert(outcome, redis.call('HGETALL', KEYS[1])) end
return outcome
"""

# KEYS: job keys; ARGV as above. Returns how many jobs moved.
_BULK_TRANSITION_LUA = _LUA_LIB + """
local allowed, fields, moved = set_of(cjson.decode(ARGV[4])), cjson.decode(ARGV[5]), 0
for _, job_key in ipairs(KEYS) do
  moved = moved + transition(job_key, ARGV[3], allowed, fields)[1]
end
return moved
"""

# KEYS[1] batch; ARGV: templates, result ttl, target status, allowed statuses (JSON), fields (JSON).
# Returns the status found. Ends the batch at once if nothing of it is queued or running.
_BATCH_STATUS_LUA = _LUA_LIB + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return '' end
if not set_of(cjson.decode(ARGV[4]))[current] then return current end
redis.call('HSET', KEYS[1], 'status', ARGV[3])
local fields = cjson.decode(ARGV[5])
for i = 1, #fields, 2 do redis.call('HSET', KEYS[1], fields[i], fields[i + 1]) end
local id = cjson.decode(redis.call('HGET', KEYS[1], 'id'))
local left = redis.call('HMGET', key('counts', id), 'queued', 'running')
if tonumber(left[1] or 0) + tonumber(left[2] or 0) == 0 then finish_batch(id) end
return current
"""


# KEYS[1] the tenant's outstanding count; ARGV: jobs to add, cap. Returns 1 and adds them if they fit under the cap.
_RESERVE_LUA = """
local after = redis.call('INCRBY', KEYS[1], tonumber(ARGV[1]))
if after > tonumber(ARGV[2]) then
  redis.call('DECRBY', KEYS[1], tonumber(ARGV[1]))
  return 0
end
return 1
"""

# KEYS[1] the tenant's outstanding count; ARGV[1] jobs never stored after all. An idle tenant leaves no key.
_RELEASE_LUA = """
if redis.call('DECRBY', KEYS[1], tonumber(ARGV[1])) <= 0 then redis.call('DEL', KEYS[1]) end
"""


@dataclass(frozen=True)
class Transition:
    """Outcome of a transition attempt: whether it happened, and the status found before it."""

    applied: bool
    previous: JobStatus | None


class JobStore:
    """All reads and writes of job records."""

    def __init__(self, client: redis.Redis, result_ttl_s: int) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self._transition = client.register_script(_TRANSITION_LUA)
        self._claim = client.register_script(_CLAIM_LUA)
        self._bulk_transition = client.register_script(_BULK_TRANSITION_LUA)
        self._batch_status = client.register_script(_BATCH_STATUS_LUA)
        self._reserve = client.register_script(_RESERVE_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    def reserve(self, tenant: str, jobs: int, cap: int) -> bool:
        """Count `jobs` new jobs against the tenant's outstanding quota, if they fit under `cap`.

        Each job's final transition gives its place back; `release` gives back jobs that were never stored.
        """
        return bool(self._reserve(keys=[redis_keys.tenant_outstanding(tenant)], args=[jobs, cap]))

    def release(self, tenant: str, jobs: int) -> None:
        self._release(keys=[redis_keys.tenant_outstanding(tenant)], args=[jobs])

    def create(self, job: Job) -> None:
        """Store a new queued job (no TTL until it finishes)."""
        self.redis.hset(redis_keys.job(job.id), mapping=job.to_redis())

    def delete(self, job_id: str) -> None:
        """Remove a job record (used to undo a submission whose enqueue failed)."""
        self.redis.delete(redis_keys.job(job_id))

    def get(self, job_id: str) -> Job:
        """The job, or `NotFound`."""
        fields = self.redis.hgetall(redis_keys.job(job_id))
        if not fields:
            raise NotFound(f"no job with id {job_id!r}")
        return Job.from_redis(fields)

    def statuses(self, job_ids: list[str]) -> list[JobStatus | None]:
        """Current status of each job (None where it does not exist), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(redis_keys.job(job_id), "status")
        return [JobStatus(s) if s else None for s in pipe.execute()]

    def _args(self, target: str, allowed: Sequence[str], fields: dict[str, Any]) -> list[Any]:
        flat: list[str] = []
        for name, value in fields.items():
            flat += [name, json.dumps(value)]
        return [TEMPLATES, self.result_ttl_s, target, json.dumps(list(allowed)), json.dumps(flat)]

    def transition(self, job_id: str, target: JobStatus, **fields: Any) -> Transition:
        """Move the job to `target` if the state machine allows it, writing `fields` with it."""
        sources = [s.value for s in allowed_sources(target)]
        applied, previous = self._transition(keys=[redis_keys.job(job_id)], args=self._args(target.value, sources, fields))
        return Transition(bool(applied), JobStatus(previous) if previous else None)

    def claim(self, job_id: str, **fields: Any) -> tuple[Transition, Job | None]:
        """`transition(job_id, RUNNING, **fields)` and, if it applied, the job as it is then, in one round trip."""
        sources = [s.value for s in allowed_sources(JobStatus.RUNNING)]
        applied, previous, *rest = self._claim(
            keys=[redis_keys.job(job_id)], args=self._args(JobStatus.RUNNING.value, sources, fields)
        )
        outcome = Transition(bool(applied), JobStatus(previous) if previous else None)
        if not rest:
            return outcome, None
        flat = rest[0]
        return outcome, Job.from_redis(dict(zip(flat[::2], flat[1::2], strict=True)))

    def transition_many(self, job_ids: Sequence[str], target: JobStatus, only_from: Sequence[JobStatus], **fields: Any) -> int:
        """Move every job of `job_ids` whose status is in `only_from` to `target`; returns how many moved."""
        sources = [s.value for s in only_from if s in allowed_sources(target)]
        if not job_ids:
            return 0
        return int(self._bulk_transition(keys=[redis_keys.job(j) for j in job_ids], args=self._args(target.value, sources, fields)))

    def set_batch_status(self, batch_id: str, target: str, only_from: Sequence[str], **fields: Any) -> str | None:
        """Set a batch's status if it is one of `only_from`; returns the status found (None: no such batch)."""
        found = self._batch_status(keys=[redis_keys.batch(batch_id)], args=self._args(target, only_from, fields))
        return found or None

    def wait_until_final(self, job_id: str, timeout_s: float, events: JobEventSource | None = None) -> Job:
        """The job once it is final, or its current state after `timeout_s`; blocks on pub/sub, never polls.

        With `events` (the API's one shared subscription per process) the wait holds no Redis connection;
        without, it subscribes on a connection of its own for the duration."""
        job = self.get(job_id)
        if job.status.is_final or timeout_s <= 0:
            return job
        deadline = time.monotonic() + timeout_s
        listening = events.listen(job_id) if events is not None else _own_subscription(self.redis, job_id)
        with listening as notice:
            # Read again after subscribing: a change between the first read and the subscription
            # published before anyone listened.
            job = self.get(job_id)
            while not job.status.is_final:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if notice.wait(remaining):
                    job = self.get(job_id)
            return job


class JobNotice(Protocol):
    def wait(self, timeout_s: float) -> bool: ...


class JobEventSource(Protocol):
    """Something that wakes a waiter on each event of one job (`api.waits.JobEvents`)."""

    def listen(self, job_id: str) -> AbstractContextManager[JobNotice]: ...


class _PubSubNotice:
    def __init__(self, pubsub: Any) -> None:
        self._pubsub = pubsub

    def wait(self, timeout_s: float) -> bool:
        return self._pubsub.get_message(timeout=timeout_s) is not None


@contextmanager
def _own_subscription(client: redis.Redis, job_id: str) -> Iterator[JobNotice]:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(redis_keys.job_events(job_id))
        yield _PubSubNotice(pubsub)
    finally:
        pubsub.close()


# Entries of `redis_keys.workers()` older than this whose worker has no heartbeat are dropped: the hash gains
# one entry per worker start and would otherwise grow for ever.
WORKER_ENTRY_KEEP_S = 24 * 3600


def announce_worker(client: redis.Redis, worker_id: str, model_name: str) -> None:
    """Record that a worker process has loaded `model_name` and serves it; forget long-gone workers."""
    now = time.time()
    client.hset(redis_keys.workers(), worker_id, json.dumps({"model": model_name, "ready_at": now}))
    for name, raw in client.hgetall(redis_keys.workers()).items():
        if json.loads(raw)["ready_at"] < now - WORKER_ENTRY_KEEP_S and not client.exists(redis_keys.worker_alive(name)):
            client.hdel(redis_keys.workers(), name)


def ready_workers(client: redis.Redis, since: float, model_name: str | None = None) -> int:
    """How many worker processes announced readiness after `since` (for `model_name`, if given)."""
    count = 0
    for raw in client.hvals(redis_keys.workers()):
        entry = json.loads(raw)
        if entry["ready_at"] >= since and model_name in (None, entry["model"]):
            count += 1
    return count
