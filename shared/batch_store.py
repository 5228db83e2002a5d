"""Batches in Redis: create in pipelines, read with counts, cancel, expire, stream results.

Batch items are ordinary job records (with `batch_id` and `custom_id`). They wait in a per-batch pending
list; workers claim them straight from there, round-robin across a model's active batches, a few
microbatches at a time (`JobStore.claim_pending`, `worker.backlog`): interactive jobs never wait behind a
backlog in Redis, and a small batch is not starved by a big one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from shared import redis_keys
from shared.batches import Batch, BatchStatus
from shared.errors import Conflict, NotFound, TooManyRequests, Unavailable
from shared.evaluation import summarise
from shared.jobs import Job, JobStatus, omitted_defaults
from shared.lua import with_now
from shared.openai_shapes import Rejected
from shared.store import JobStore

CHUNK = 2000

# The fields of a compact item row after its job id (see `shared.batches.batch_items`).
ITEM_FIELDS = ("question", "course", "top_k", "params", "custom_id", "retrieval", "expected_document", "reference_answer")
_ITEM_FIELDS_JSON = json.dumps(ITEM_FIELDS)
_DEFAULTS_JSON = json.dumps(omitted_defaults(ITEM_FIELDS))

# KEYS[1] jobs list, KEYS[2] pending list; ARGV[1] job key template, ARGV[2] JSON of the fields every item
# shares (already JSON-encoded), ARGV[3] JSON list of rows [id, one value per ITEM_FIELDS name], ARGV[4] the
# ITEM_FIELDS names, ARGV[5] JSON {name: JSON of its default} of the fields a job record leaves out while
# at their default (`shared.jobs.omitted_defaults`), ARGV[6] the staging TTL: every key written here expires
# unless `_COMMIT_LUA` makes it permanent, so an API process dying mid-upload leaves nothing behind for long. Writes each item as Job.to_redis would (a test pins the
# round trip), in Redis, from one compact payload: encoding 100,000 jobs field by field in Python was most
# of the time spent accepting a batch.
_CREATE_ITEMS_LUA = """
local common = cjson.decode(ARGV[2])
local names = cjson.decode(ARGV[4])
local defaults = cjson.decode(ARGV[5])
local ids = {}
for _, item in ipairs(cjson.decode(ARGV[3])) do
  local id = item[1]
  local fields = {'status', 'queued', 'id', cjson.encode(id), 'model', common.model, 'created_at', common.created_at,
    'batch_id', common.batch_id, 'tenant', common.tenant}
  for i, name in ipairs(names) do
    -- A row shorter than the names (written before the later fields existed) leaves them at their defaults.
    local encoded = item[i + 1] == nil and defaults[name] or cjson.encode(item[i + 1])
    if encoded ~= defaults[name] then
      table.insert(fields, name)
      table.insert(fields, encoded)
    end
  end
  local job_key = (string.gsub(ARGV[1], '{id}', id))
  redis.call('HSET', job_key, unpack(fields))
  redis.call('EXPIRE', job_key, ARGV[6])
  table.insert(ids, id)
end
redis.call('RPUSH', KEYS[1], unpack(ids))
redis.call('RPUSH', KEYS[2], unpack(ids))
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return #ids
"""


# Seconds staged items live before the batch is committed: an upload that has not committed by then fails,
# and one whose API process died leaves nothing behind longer than this.
STAGING_TTL_S = 900

# Makes a staged batch real, or refuses it whole; nothing it refuses has been changed.
# KEYS: [1] batch, [2] counts, [3] jobs list, [4] pending list, [5] tenant's batches, [6] deadlines,
# [7] active batches of the model, [8] tenant's outstanding count, [9] tenant's stored batches,
# [10] tenant's stored items, [11] the Idempotency-Key's key (or '' without one).
# ARGV: [1] batch record (JSON object), [2] items, [3] created_at, [4] expires_at, [5] batch id, [6] job key
# template, [7] batch key template, [8] outstanding cap, [9] open-batches cap, [10] stored-items cap,
# [11] the key's pending entry, [12] its final entry, [13] its TTL, [14] TTL of the tenant's keys,
# [15] TTL of an ended (cancelled, expired) batch's items, [16] how many staged items are refused lines (status
# failed, in no pending list: `stage_rejected`), [17] their TTL (they never transition, so never get one later),
# [18] the staging TTL (given back on a refusal).
# Returns {'ok'} or {reason, number}: 'key' (the Idempotency-Key no longer names this upload), 'open',
# 'stored', 'quota' (with the figure in use), 'missing' (a staged item expired).
_COMMIT_LUA = with_now("""
local now = tonumber(now())
local total, id = tonumber(ARGV[2]), ARGV[5]
local rejected = tonumber(ARGV[16])
local runnable = total - rejected
if KEYS[11] ~= '' and redis.call('GET', KEYS[11]) ~= ARGV[11] then return {'key', 0} end
local ended = {completed = true, cancelled = true, expired = true, failed = true}
-- Batches open at the last look: note the ones that have ended since (their items expire with their record).
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[9], '+inf', '+inf')) do
  local other = string.match(member, '^(.*):%d+$')
  local bkey = (string.gsub(ARGV[7], '{id}', other))
  local status = redis.call('HGET', bkey, 'status')
  if not status then
    redis.call('ZADD', KEYS[9], now, member)
  elseif ended[status] then
    local ttl = redis.call('TTL', bkey)
    redis.call('ZADD', KEYS[9], ttl > 0 and now + ttl or now + tonumber(ARGV[14]), member)
  end
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', now)) do
  local other, items = string.match(member, '^(.*):(%d+)$')
  redis.call('DECRBY', KEYS[10], tonumber(items))
  redis.call('ZREM', KEYS[5], other)
end
redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now)
local open = redis.call('ZCOUNT', KEYS[9], '+inf', '+inf')
if open >= tonumber(ARGV[9]) then return {'open', open} end
local stored = tonumber(redis.call('GET', KEYS[10]) or '0')
if stored + total > tonumber(ARGV[10]) then return {'stored', stored} end
local outstanding = tonumber(redis.call('GET', KEYS[8]) or '0')
if outstanding + runnable > tonumber(ARGV[8]) then return {'quota', outstanding} end
local ids = redis.call('LRANGE', KEYS[3], 0, -1)
if #ids ~= total or redis.call('LLEN', KEYS[4]) ~= runnable then return {'missing', total - #ids} end
-- One pass over the items (this loop is most of the script's time, and Redis serves nobody meanwhile): PERSIST
-- answers 0 for a staged item that expired (every staged item has a TTL), and the ones made permanent before it
-- get their staging TTL back, so a refused commit changes nothing.
local prefix, suffix = string.match(ARGV[6], '^(.*){id}(.*)$')
for n, job_id in ipairs(ids) do
  if redis.call('PERSIST', prefix .. job_id .. suffix) == 0 then
    for undo = 1, n - 1 do redis.call('EXPIRE', prefix .. ids[undo] .. suffix, ARGV[18]) end
    return {'missing', 1}
  end
end
-- Nothing can fail from here on.
if rejected > 0 then
  for _, job_id in ipairs(ids) do
    local job_key = prefix .. job_id .. suffix
    if redis.call('HGET', job_key, 'status') == 'failed' then redis.call('EXPIRE', job_key, ARGV[17]) end
  end
end
redis.call('PERSIST', KEYS[3])
redis.call('PERSIST', KEYS[4])
local record = cjson.decode(ARGV[1])
for name, value in pairs(record) do redis.call('HSET', KEYS[1], name, value) end
redis.call('HSET', KEYS[1], 'ended_ttl_s', ARGV[15])
redis.call('HSET', KEYS[2], 'queued', runnable, 'running', 0, 'succeeded', 0, 'failed', rejected, 'cancelled', 0, 'expired', 0)
redis.call('ZADD', KEYS[5], ARGV[3], id)
redis.call('ZADD', KEYS[6], ARGV[4], id)
redis.call('RPUSH', KEYS[7], id)
redis.call('INCRBY', KEYS[8], runnable)
redis.call('ZADD', KEYS[9], '+inf', id .. ':' .. total)
redis.call('INCRBY', KEYS[10], total)
-- The tenant's own accounting keys go once the tenant has been idle long enough.
for _, i in ipairs({5, 9, 10}) do redis.call('EXPIRE', KEYS[i], ARGV[14]) end
if KEYS[11] ~= '' then redis.call('SET', KEYS[11], ARGV[12], 'EX', ARGV[13]) end
return {'ok', 0}
""")


# KEYS: job keys or a batch's own keys; ARGV[1] seconds, ARGV[2] JSON list of the statuses whose keys shorten
# ('[]': any key). Gives each key at most ARGV[1] seconds to live: the items of a cancelled or expired batch
# are not kept for the full result TTL. Running items keep theirs (their final transition sets it).
_SHORTEN_LUA = """
local ttl = tonumber(ARGV[1])
local only = {}
local any = true
for _, status in ipairs(cjson.decode(ARGV[2])) do only[status] = true; any = false end
local n = 0
for _, k in ipairs(KEYS) do
  if any or only[redis.call('HGET', k, 'status') or ''] then
    local left = redis.call('TTL', k)
    if left == -1 or left > ttl then
      redis.call('EXPIRE', k, ttl)
      n = n + 1
    end
  end
end
return n
"""


# KEYS[1] the original batch; ARGV[1] the retry's id. Appends to the JSON list `retried_by` (if the batch exists).
_LINK_LUA = """
local raw = redis.call('HGET', KEYS[1], 'retried_by')
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ids = (raw and raw ~= 'null') and cjson.decode(raw) or {}
table.insert(ids, ARGV[1])
redis.call('HSET', KEYS[1], 'retried_by', cjson.encode(ids))
return 1
"""


@dataclass(frozen=True)
class BatchLimits:
    """What one tenant may hold: checked, and the batch counted, in the same script that makes it real."""

    max_outstanding_jobs: int = 1_000_000_000
    max_open_batches: int = 1_000_000_000
    max_stored_items: int = 1_000_000_000
    ended_ttl_s: int = 3600
    # The tenant's accounting keys outlive their last batch by at most this (a batch's window plus its results).
    tenant_keys_ttl_s: int = 40 * 86400


@dataclass(frozen=True)
class IdempotencyClaim:
    """An Idempotency-Key claimed (pending) for this upload; the commit swaps in `final` with `ttl_s`."""

    key: str
    pending: str
    final: str
    ttl_s: int


# Seconds a tenant over a batch cap is asked to wait before retrying.
CAP_RETRY_AFTER_S = 60


class BatchStore:
    """All reads and writes of batches; job transitions go through `JobStore` so counts stay exact."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self.redis: redis.Redis = jobs.redis
        self._create_items = self.redis.register_script(_CREATE_ITEMS_LUA)
        self._commit = self.redis.register_script(_COMMIT_LUA)
        self._shorten = self.redis.register_script(_SHORTEN_LUA)
        self._link = self.redis.register_script(_LINK_LUA)

    def create(
        self, batch: Batch, items: list[list[Any]], limits: BatchLimits | None = None, claim: IdempotencyClaim | None = None
    ) -> None:
        """Store the batch and its items (rows of `batches.batch_items`) whole, or nothing (see `stage`, `commit`)."""
        written: list[str] = []
        try:
            for start in range(0, len(items), CHUNK):
                written += self.stage(batch, items[start : start + CHUNK])
            self.commit(batch, limits or BatchLimits(), claim)
        except BaseException:
            self.discard(batch.id, written)
            raise

    def check_quota(self, tenant: str, total: int, limits: BatchLimits) -> None:
        """429 early, before anything is written, when `total` more jobs cannot fit the outstanding quota
        (`commit` checks again, atomically)."""
        outstanding = int(self.redis.get(redis_keys.tenant_outstanding(tenant)) or 0)
        if outstanding + total > limits.max_outstanding_jobs:
            _raise_refusal("quota", outstanding, total, limits)

    def stage(self, batch: Batch, rows: list[list[Any]]) -> list[str]:
        """Write items that expire after `STAGING_TTL_S` unless the batch is committed; returns their ids.

        Staged items are in no list a feeder or reader looks at: the batch does not exist yet.
        """
        shared_fields = {"model": batch.model, "created_at": batch.created_at, "batch_id": batch.id, "tenant": batch.tenant}
        common = json.dumps({name: json.dumps(value) for name, value in shared_fields.items()})
        try:
            self._create_items(
                keys=[redis_keys.batch_jobs(batch.id), redis_keys.batch_pending(batch.id)],
                args=[redis_keys.job("{id}"), common, json.dumps(rows), _ITEM_FIELDS_JSON, _DEFAULTS_JSON, STAGING_TTL_S],
            )
        except redis.RedisError as exc:
            raise Unavailable("the job store (Redis) failed while storing the batch; nothing was kept") from exc
        return [row[0] for row in rows]

    def commit(self, batch: Batch, limits: BatchLimits, claim: IdempotencyClaim | None = None, rejected: int = 0) -> None:
        """Make the staged batch real in one script: its items permanent, the batch registered and fed, counted
        against the tenant's quota and caps, the Idempotency-Key pointed at it. Refused whole otherwise.

        `rejected` of the staged items are refused lines (`stage_rejected`): counted failed from the start."""
        tenant = batch.tenant
        keys = [
            redis_keys.batch(batch.id),
            redis_keys.batch_counts(batch.id),
            redis_keys.batch_jobs(batch.id),
            redis_keys.batch_pending(batch.id),
            redis_keys.tenant_batches(tenant),
            redis_keys.batch_deadlines(),
            redis_keys.active_batches(batch.model),
            redis_keys.tenant_outstanding(tenant),
            redis_keys.tenant_stored_batches(tenant),
            redis_keys.tenant_stored_items(tenant),
            claim.key if claim else "",
        ]
        args = [
            json.dumps(batch.to_redis()),
            batch.total,
            batch.created_at,
            batch.expires_at,
            batch.id,
            redis_keys.job("{id}"),
            redis_keys.batch("{id}"),
            limits.max_outstanding_jobs,
            limits.max_open_batches,
            limits.max_stored_items,
            claim.pending if claim else "",
            claim.final if claim else "",
            claim.ttl_s if claim else 0,
            limits.tenant_keys_ttl_s,
            limits.ended_ttl_s,
            rejected,
            int(batch.expires_at - batch.created_at) + self.jobs.result_ttl_s,
            STAGING_TTL_S,
        ]
        try:
            outcome, figure = self._commit(keys=keys, args=args)
        except redis.RedisError as exc:
            raise Unavailable("the job store (Redis) failed while storing the batch; nothing was kept") from exc
        _raise_refusal(str(outcome), int(figure), batch.total, limits)

    def stage_rejected(self, batch: Batch, rejected: list[Rejected]) -> list[str]:
        """Stage refused lines as items already `failed` (in input order, in no pending list); they expire like
        `stage`'s unless committed. Returns their ids."""
        now = time.time()
        jobs_key = redis_keys.batch_jobs(batch.id)
        pipe = self.redis.pipeline(transaction=False)
        for line in rejected:
            job = Job(
                id=line.job_id, status=JobStatus.FAILED, question="", model=batch.model, error=line.error,
                created_at=batch.created_at, finished_at=now, batch_id=batch.id, custom_id=line.custom_id, tenant=batch.tenant,
            )
            pipe.hset(redis_keys.job(job.id), mapping=job.to_redis())
            pipe.expire(redis_keys.job(job.id), STAGING_TTL_S)
        pipe.rpush(jobs_key, *[line.job_id for line in rejected])
        pipe.expire(jobs_key, STAGING_TTL_S)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise Unavailable("the job store (Redis) failed while storing the batch; nothing was kept") from exc
        return [line.job_id for line in rejected]

    def link_retry(self, original_id: str, retry_id: str) -> None:
        """Note on the original batch that `retry_id` retries it (the retry names its original itself)."""
        self._link(keys=[redis_keys.batch(original_id)], args=[retry_id])

    def jobs_of(self, batch_id: str) -> Iterator[Job]:
        """The batch's items as job records, in input order, read a chunk at a time."""
        for ids in self.job_ids(batch_id):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(redis_keys.job(job_id))
            for fields in pipe.execute():
                if fields:
                    yield Job.from_redis(fields)

    def discard(self, batch_id: str, job_ids: list[str]) -> None:
        """Delete what `stage` wrote for a batch never committed (best effort: its TTL deletes it anyway)."""
        try:
            for start in range(0, len(job_ids), CHUNK):
                self.redis.delete(*[redis_keys.job(j) for j in job_ids[start : start + CHUNK]])
            self.redis.delete(redis_keys.batch_jobs(batch_id), redis_keys.batch_pending(batch_id))
        except redis.RedisError:
            pass

    def get(self, batch_id: str, tenant: str | None = None) -> tuple[Batch, dict[str, int]]:
        """The batch and its counts, read together. Another tenant's batch is not found, as if it did not exist."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(redis_keys.batch(batch_id))
        pipe.hgetall(redis_keys.batch_counts(batch_id))
        fields, counts = pipe.execute()
        batch = Batch.from_redis(fields) if fields else None
        if batch is None or (tenant is not None and batch.tenant != tenant):
            raise NotFound(f"no batch with id {batch_id!r}")
        return batch, {k: int(v) for k, v in counts.items()}

    def public(self, batch_id: str, tenant: str | None = None) -> dict[str, Any]:
        batch, counts = self.get(batch_id, tenant)
        if batch.evaluate and batch.evaluation is None and batch.status.has_ended:
            batch.evaluation = self.evaluation(batch.id)
        return batch.to_public(counts)

    def evaluation(self, batch_id: str) -> dict[str, Any]:
        """An evaluated batch's figures: its items' scores summed up once it has ended, then kept in its record
        (one pipelined read per 2,000 items, once per batch; the item that ends a batch wrote its scores in the
        same script, so all are there)."""

        def scores() -> Iterator[dict[str, Any] | None]:
            for ids in self.job_ids(batch_id):
                pipe = self.redis.pipeline(transaction=False)
                for job_id in ids:
                    pipe.hmget(redis_keys.job(job_id), "status", "evaluation")
                for status, raw in pipe.execute():
                    if status == JobStatus.SUCCEEDED.value and raw:
                        yield json.loads(raw)

        figures = summarise(scores())
        self.redis.hset(redis_keys.batch(batch_id), "evaluation", json.dumps(figures))
        return figures

    def list(self, tenant: str, limit: int, after: str | None) -> tuple[list[dict[str, Any]], bool]:
        """The tenant's batches newest first, `limit` of them, starting after the batch `after`."""
        index = redis_keys.tenant_batches(tenant)
        start = 0
        if after is not None:
            rank = self.redis.zrevrank(index, after)
            if rank is None:
                raise NotFound(f"no batch with id {after!r}")
            start = rank + 1
        ids = self.redis.zrevrange(index, start, start + limit)
        page = []
        for batch_id in ids[:limit]:
            try:
                page.append(self.public(batch_id))
            except NotFound:
                # Expired records leave their id in the index until the next sweep.
                self.redis.zrem(index, batch_id)
        return page, len(ids) > limit

    def cancel(self, batch_id: str, tenant: str | None = None) -> dict[str, Any]:
        """Stop feeding the batch and cancel its queued items at once; running items finish."""
        self.get(batch_id, tenant)
        found = self.jobs.set_batch_status(batch_id, BatchStatus.CANCELLING.value, [BatchStatus.IN_PROGRESS.value])
        if found is None:
            raise NotFound(f"no batch with id {batch_id!r}")
        if BatchStatus(found).has_ended:
            raise Conflict(f"batch has already ended: {found}", details={"status": found})
        self.redis.delete(redis_keys.batch_pending(batch_id))
        self._move_items(batch_id, JobStatus.CANCELLED, [JobStatus.QUEUED], finished_at=time.time())
        self._shorten_ended(batch_id)
        return self.public(batch_id)

    def _shorten_ended(self, batch_id: str) -> None:
        """Give a cancelled or expired batch's ended items, and the batch once it has ended, the short TTL."""
        raw = self.redis.hget(redis_keys.batch(batch_id), "ended_ttl_s")
        ttl_s = int(raw) if raw else BatchLimits.ended_ttl_s
        ended = json.dumps([JobStatus.CANCELLED.value, JobStatus.EXPIRED.value])
        for ids in self.job_ids(batch_id):
            self._shorten(keys=[redis_keys.job(j) for j in ids], args=[ttl_s, ended])
        status = self.redis.hget(redis_keys.batch(batch_id), "status")
        if status and BatchStatus(status).has_ended:
            own = [redis_keys.batch(batch_id), redis_keys.batch_counts(batch_id), redis_keys.batch_jobs(batch_id)]
            self._shorten(keys=own, args=[ttl_s, "[]"])

    def expire_due(self, now: float | None = None) -> list[str]:
        """End every batch whose completion window has passed: unfinished items become `expired`."""
        now = time.time() if now is None else now
        expired = []
        for batch_id in self.redis.zrangebyscore(redis_keys.batch_deadlines(), "-inf", now):
            found = self.jobs.set_batch_status(
                batch_id,
                BatchStatus.EXPIRED.value,
                [BatchStatus.IN_PROGRESS.value, BatchStatus.CANCELLING.value],
                expired_at=now,
            )
            self.redis.delete(redis_keys.batch_pending(batch_id))
            if found and not BatchStatus(found).has_ended:
                self._move_items(batch_id, JobStatus.EXPIRED, [JobStatus.QUEUED, JobStatus.RUNNING], finished_at=now)
                self._shorten_ended(batch_id)
                expired.append(batch_id)
            self.redis.zrem(redis_keys.batch_deadlines(), batch_id)
        return expired

    def _move_items(self, batch_id: str, target: JobStatus, only_from: list[JobStatus], **fields: Any) -> int:
        moved = 0
        for ids in self.job_ids(batch_id):
            moved += self.jobs.transition_many(ids, target, only_from, **fields)
        return moved

    def job_ids(self, batch_id: str) -> Iterator[list[str]]:
        """The batch's job ids in input order, in chunks."""
        start = 0
        while True:
            ids = self.redis.lrange(redis_keys.batch_jobs(batch_id), start, start + CHUNK - 1)
            if not ids:
                return
            yield ids
            start += CHUNK

    def results(self, batch_id: str, status: JobStatus | None = None, tenant: str | None = None) -> Iterator[dict[str, Any]]:
        """One result per item in input order (optionally only items with `status`), as they stand now."""
        self.get(batch_id, tenant)
        for ids in self.job_ids(batch_id):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(redis_keys.job(job_id))
            for job_id, fields in zip(ids, pipe.execute(), strict=True):
                if not fields:
                    continue
                job = Job.from_redis(fields)
                if status is not None and job.status is not status:
                    continue
                yield {
                    "custom_id": job.custom_id,
                    "job_id": job.id,
                    "status": job.status.value,
                    "answer": job.answer,
                    "sources": job.sources,
                    "error": job.error,
                    "usage": job.usage,
                }


def _raise_refusal(outcome: str, figure: int, total: int, limits: BatchLimits) -> None:
    """The error for a refused commit (nothing for `ok`)."""
    if outcome == "ok":
        return
    if outcome == "open":
        raise TooManyRequests(
            f"you have {figure} batches not yet ended, the most allowed; wait for one to end",
            retry_after_s=CAP_RETRY_AFTER_S,
            details={"max_open_batches": limits.max_open_batches},
        )
    if outcome == "stored":
        raise TooManyRequests(
            f"this batch's {total} items would take your stored batch items ({figure}, ended batches' included until "
            f"they expire) over the limit of {limits.max_stored_items}",
            retry_after_s=CAP_RETRY_AFTER_S,
            details={"max_stored_batch_items": limits.max_stored_items, "stored": figure, "requested": total},
        )
    if outcome == "quota":
        raise TooManyRequests(
            f"this would take your queued and running jobs over the limit of {limits.max_outstanding_jobs}; wait for some to finish",
            retry_after_s=30,
            details={"max_outstanding_jobs": limits.max_outstanding_jobs, "requested": total},
        )
    if outcome == "key":
        raise Conflict("the Idempotency-Key's claim expired before the batch was stored; nothing was kept, retry")
    raise Unavailable("the batch took too long to store and its staged items expired; nothing was kept, retry")


def encode_result(result: dict[str, Any]) -> bytes:
    return json.dumps(result, ensure_ascii=False).encode() + b"\n"
