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
        "job": redis_keys.job("{id}"),
        "pending": redis_keys.batch_pending("{id}"),
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

-- What a script's transitions change besides the jobs themselves (worker job sets, the message audit's sent
-- sets, tenants' outstanding counts, usage, batch counts), summed up and written once per worker, model, tenant
-- and batch by `flush`: a microbatch's claims or results in one script cost one write of each, not one per job.
local function new_effects()
  return {joined = {}, left = {}, unsent = {}, outstanding = {}, usage = {}, counts = {}, ended = {}}
end

local function add_to(t, k, v)
  local list = t[k]
  if not list then list = {}; t[k] = list end
  table.insert(list, v)
end

-- `unpack` has a bound on its arguments: set commands go in slices.
local function each_slice(command, k, members)
  for i = 1, #members, 1000 do
    redis.call(command, k, unpack(members, i, math.min(i + 999, #members)))
  end
end

local function flush(fx)
  for worker, ids in pairs(fx.left) do each_slice('SREM', key('worker_jobs', worker), ids) end
  for worker, ids in pairs(fx.joined) do
    each_slice('SADD', key('worker_jobs', worker), ids)
    redis.call('SADD', T['with_jobs'], worker)
  end
  -- Its message has been taken (or no longer matters): the message audit stops watching it.
  for model, ids in pairs(fx.unsent) do each_slice('ZREM', key('sent', model), ids) end
  -- Ended jobs no longer count against their tenant's quota of outstanding jobs.
  for tenant, n in pairs(fx.outstanding) do
    if redis.call('DECRBY', key('outstanding', tenant), n) <= 0 then redis.call('DEL', key('outstanding', tenant)) end
  end
  record_usage(fx.usage)
  for batch, deltas in pairs(fx.counts) do
    local counts = key('counts', batch)
    for status, delta in pairs(deltas) do
      if delta ~= 0 then redis.call('HINCRBY', counts, status, delta) end
    end
    local ended = fx.ended[batch]
    if ended then
      local left = redis.call('HMGET', counts, 'queued', 'running', 'cancelled')
      -- An item that was running when its batch was cancelled keeps no more than the batch's other items.
      -- (Looked up only once something in the batch was cancelled: most final transitions pay nothing.)
      if tonumber(left[3] or 0) > 0 and redis.call('HGET', key('batch', batch), 'status') == 'cancelling' then
        local ttl = ended_ttl(key('batch', batch))
        for _, job_key in ipairs(ended) do redis.call('EXPIRE', job_key, ttl) end
      end
      if tonumber(left[1] or 0) + tonumber(left[2] or 0) == 0 then finish_batch(batch) end
    end
  end
end

local READ = {'status', 'worker', 'id', 'model', 'tenant', 'batch_id', 'attempts'}

-- Moves one job to `target` if its status is in `allowed`, writing `fields` (a flat list of name, JSON value)
-- with it; the other keys it touches go through `fx` (written by `flush`). `before`: the job's READ fields if
-- the caller has read them already. Returns {1 if it moved, the status found}.
local function transition(job_key, target, allowed, fields, fx, before)
  -- One read of every field the transition looks at, one write of the status with the fields: a transition
  -- is the bulk of the Redis commands of a job (see docs/capacity.md).
  before = before or redis.call('HMGET', job_key, unpack(READ))
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
  if current == 'running' and previous_worker ~= cjson.null then add_to(fx.left, previous_worker, id) end
  -- The fields read below, as this transition leaves them.
  local after = {worker = before[2], model = before[4], tenant = before[5], batch_id = before[6]}
  local writes = {'status', target}
  if target == 'running' then
    table.insert(writes, 'attempts')
    table.insert(writes, tostring((tonumber(before[7] or '0') or 0) + 1))
  end
  for i = 1, #fields, 2 do
    table.insert(writes, fields[i])
    table.insert(writes, fields[i + 1])
    if TRACKED[fields[i]] then after[fields[i]] = fields[i + 1] end
  end
  redis.call('HSET', job_key, unpack(writes))
  if after.model then add_to(fx.unsent, cjson.decode(after.model), id) end
  if target == 'running' then
    local worker = cjson.decode(after.worker or 'null')
    if worker ~= cjson.null then add_to(fx.joined, worker, id) end
  end
  if FINAL[target] then
    redis.call('EXPIRE', job_key, RESULT_TTL)
    if not FINAL[current] then
      local tenant = after.tenant and cjson.decode(after.tenant) or T['local_tenant']
      fx.outstanding[tenant] = (fx.outstanding[tenant] or 0) + 1
    end
    -- Usage per tenant (shared/usage.py) moves with the result that records it: counted once, never lost.
    if target == 'succeeded' and current ~= target then note_usage(fx.usage, after.tenant, after.model, after.usage) end
    -- Waiters (the API's long polls) wait for a final status only.
    redis.call('PUBLISH', job_key .. ':events', target)
  end
  local batch = after.batch_id
  if batch and current ~= target then
    batch = cjson.decode(batch)
    if batch ~= cjson.null then
      local deltas = fx.counts[batch]
      if not deltas then deltas = {}; fx.counts[batch] = deltas end
      deltas[current] = (deltas[current] or 0) - 1
      deltas[target] = (deltas[target] or 0) + 1
      if FINAL[target] then add_to(fx.ended, batch, job_key) end
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
local fx = new_effects()
local outcome = transition(KEYS[1], ARGV[3], set_of(cjson.decode(ARGV[4])), cjson.decode(ARGV[5]), fx)
flush(fx)
return outcome
"""

# KEYS[1] job; ARGV as above. The transition, then the job's fields if it applied: a claim and its read in one
# round trip.
_CLAIM_LUA = _LUA_LIB + """
local fx = new_effects()
local outcome = transition(KEYS[1], ARGV[3], set_of(cjson.decode(ARGV[4])), cjson.decode(ARGV[5]), fx)
flush(fx)
if outcome[1] == 1 then table.insert(outcome, redis.call('HGETALL', KEYS[1])) end
return outcome
"""

# KEYS: job keys; ARGV as above. Returns how many jobs moved.
_BULK_TRANSITION_LUA = _LUA_LIB + """
local allowed, fields, moved = set_of(cjson.decode(ARGV[4])), cjson.decode(ARGV[5]), 0
local fx = new_effects()
for _, job_key in ipairs(KEYS) do
  moved = moved + transition(job_key, ARGV[3], allowed, fields, fx)[1]
end
flush(fx)
return moved
"""

# KEYS: job keys; ARGV: templates, result ttl, JSON {target: allowed statuses}, JSON list of [target, fields]
# per key. Each job's final transition, the shared writes once: a microbatch's results in one round trip.
# Returns {1 if it moved, the status found} per job.
_FINISH_MANY_LUA = _LUA_LIB + """
local sources, finals, outcomes = cjson.decode(ARGV[3]), cjson.decode(ARGV[4]), {}
local allowed = {}
for target, list in pairs(sources) do allowed[target] = set_of(list) end
local fx = new_effects()
for i, job_key in ipairs(KEYS) do
  local target, fields = finals[i][1], finals[i][2]
  outcomes[i] = transition(job_key, target, allowed[target], fields, fx)
end
flush(fx)
return outcomes
"""

# KEYS: none; ARGV: templates, result ttl, 'running', allowed (JSON), fields of the claim (JSON), the model's
# active list, n. Takes up to n items of the model's batches from their pending lists, round-robin (an equal
# share of what is left from each batch per turn, rotating the active list; a batch whose list is empty leaves
# it), and claims each for the worker named in the fields, in the same call: an item is in a pending list or
# claimed, never in between, so nothing taken is lost with the taker. Items no longer queued (cancelled,
# expired) are dropped. Returns the claimed jobs' fields (flat lists), as the claim leaves them.
_CLAIM_PENDING_LUA = _LUA_LIB + """
local allowed, fields = set_of(cjson.decode(ARGV[4])), cjson.decode(ARGV[5])
local active, n = ARGV[6], tonumber(ARGV[7])
local fx = new_effects()
local claimed, taken = {}, 0
local batches = redis.call('LLEN', active)
local function claim(id)
  taken = taken + 1
  local job_key = key('job', id)
  local flat = redis.call('HGETALL', job_key)
  local job = {}
  for i = 1, #flat, 2 do job[flat[i]] = flat[i + 1] end
  local before = {}
  for i, name in ipairs(READ) do before[i] = job[name] end
  if transition(job_key, 'running', allowed, fields, fx, before)[1] == 1 then
    job['status'] = 'running'
    job['attempts'] = tostring((tonumber(job['attempts'] or '0') or 0) + 1)
    for i = 1, #fields, 2 do job[fields[i]] = fields[i + 1] end
    local out = {}
    for name, value in pairs(job) do
      table.insert(out, name)
      table.insert(out, value)
    end
    table.insert(claimed, out)
  end
end
while taken < n and batches > 0 do
  -- One round: each batch in turn gives an equal share of what is still wanted.
  local share = math.ceil((n - taken) / batches)
  for _ = 1, batches do
    if taken >= n or batches == 0 then break end
    local batch = redis.call('LMOVE', active, active, 'LEFT', 'RIGHT')
    local ids = redis.call('LPOP', key('pending', batch), math.min(share, n - taken))
    if ids then
      for _, id in ipairs(ids) do claim(id) end
    else
      redis.call('LREM', active, 0, batch)
      batches = batches - 1
    end
  end
end
flush(fx)
return claimed
"""

# KEYS: job keys; ARGV: templates, result ttl, the worker (JSON), the model's active list. Gives back items a
# worker claimed from their batches and never started (it is stopping): each still running under that worker
# is queued again with its attempt returned, at the front of its batch's pending list, and its batch goes to
# the front of the active list, so the next worker to take takes them first. Returns how many went back.
_GIVE_BACK_LUA = _LUA_LIB + """
local worker, active = ARGV[3], ARGV[4]
local fx = new_effects()
local given, batches = 0, {}
for i = #KEYS, 1, -1 do
  local job_key = KEYS[i]
  local before = redis.call('HMGET', job_key, unpack(READ))
  local batch = cjson.decode(before[6] or 'null')
  if before[1] == 'running' and before[2] == worker and batch ~= cjson.null then
    local attempts = math.max(0, (tonumber(before[7] or '0') or 0) - 1)
    local fields = {'worker', 'null', 'started_at', 'null', 'attempts', tostring(attempts)}
    if transition(job_key, 'queued', {running = true}, fields, fx, before)[1] == 1 then
      redis.call('LPUSH', key('pending', batch), cjson.decode(before[3]))
      batches[batch] = true
      given = given + 1
    end
  end
end
flush(fx)
for batch in pairs(batches) do
  redis.call('LREM', active, 0, batch)
  redis.call('LPUSH', active, batch)
end
return given
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
        self._finish_many = client.register_script(_FINISH_MANY_LUA)
        self._claim_pending = client.register_script(_CLAIM_PENDING_LUA)
        self._give_back = client.register_script(_GIVE_BACK_LUA)
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

    def finish_many(self, finals: Sequence[tuple[str, JobStatus, dict[str, Any]]]) -> list[Transition]:
        """Each `(job id, final status, fields)` as `transition` would store it, in one round trip (the writes the
        jobs share, such as batch counts and usage, once); an outcome per job."""
        if not finals:
            return []
        sources = {target.value: [s.value for s in allowed_sources(target)] for _, target, _ in finals}
        encoded = [[target.value, [x for name, value in fields.items() for x in (name, json.dumps(value))]] for _, target, fields in finals]
        outcomes = self._finish_many(
            keys=[redis_keys.job(job_id) for job_id, _, _ in finals],
            args=[TEMPLATES, self.result_ttl_s, json.dumps(sources), json.dumps(encoded)],
        )
        return [Transition(bool(applied), JobStatus(previous) if previous else None) for applied, previous in outcomes]

    def claim_pending(self, model_name: str, n: int, **fields: Any) -> list[Job]:
        """Up to `n` items of `model_name`'s batches, taken round-robin from their pending lists and claimed
        (`transition(RUNNING, **fields)`) in the same Lua call; the jobs as the claim leaves them."""
        sources = [s.value for s in allowed_sources(JobStatus.RUNNING)]
        args = self._args(JobStatus.RUNNING.value, sources, fields) + [redis_keys.active_batches(model_name), n]
        return [Job.from_redis(dict(zip(flat[::2], flat[1::2], strict=True))) for flat in self._claim_pending(args=args)]

    def give_back(self, job_ids: Sequence[str], worker: str, model_name: str) -> int:
        """Queue again, at the front of their batches, the items of `job_ids` that `worker` claimed with
        `claim_pending` and never started; returns how many went back."""
        if not job_ids:
            return 0
        args = [TEMPLATES, self.result_ttl_s, json.dumps(worker), redis_keys.active_batches(model_name)]
        return int(self._give_back(keys=[redis_keys.job(j) for j in job_ids], args=args))

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
                    # Only final statuses are published: the current one is read at the end.
                    return self.get(job_id)
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
