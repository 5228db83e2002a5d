"""Batches in Redis: create in pipelines, read with counts, cancel, expire, stream results, feed the workers.

Batch items are ordinary job records (with `batch_id` and `custom_id`). They wait in a per-batch pending
list; workers' feeders take them round-robin across a model's active batches into the model's batch queue,
keeping that queue shallow: interactive jobs never wait behind a backlog, and a small batch is not starved
by a big one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis

from shared import redis_keys
from shared.lua import with_now
from shared.batches import COUNT_NAMES, Batch, BatchStatus
from shared.errors import Conflict, NotFound, Unavailable
from shared.jobs import Job, JobStatus, omitted_defaults
from shared.store import JobStore

CHUNK = 2000

# KEYS: none; ARGV[1] active list, ARGV[2] pending template, ARGV[3] the model's sent set, ARGV[4] n.
# Rotates the active list, taking one item per batch per turn; drops batches whose pending list is empty.
# Taken items are noted as sent at once: if the feeder dies before sending them, the message audit does.
# Returns {the time they were noted as sent (Redis's clock), the ids}.
_TAKE_LUA = with_now("""
local active, sent, n = ARGV[1], ARGV[3], tonumber(ARGV[4])
local now = now()
local taken = {}
local batches = redis.call('LLEN', active)
while #taken < n and batches > 0 do
  local batch = redis.call('LMOVE', active, active, 'LEFT', 'RIGHT')
  local id = redis.call('LPOP', (string.gsub(ARGV[2], '{id}', batch)))
  if id then
    table.insert(taken, id)
    redis.call('ZADD', sent, now, id)
  else
    redis.call('LREM', active, 0, batch)
    batches = batches - 1
  end
end
return {tostring(now), taken}
""")


# The fields of a compact item row after its job id (see `shared.batches.batch_items`).
ITEM_FIELDS = ("question", "course", "top_k", "params", "custom_id")

# KEYS[1] jobs list, KEYS[2] pending list; ARGV[1] job key template, ARGV[2] JSON of the fields every item
# shares (already JSON-encoded), ARGV[3] JSON list of rows [id, one value per ITEM_FIELDS name], ARGV[4] the
# ITEM_FIELDS names, ARGV[5] JSON {name: JSON of its default} of the fields a job record leaves out while
# at their default (`shared.jobs.omitted_defaults`). Writes each item as Job.to_redis would (a test pins the
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
    local encoded = cjson.encode(item[i + 1])
    if encoded ~= defaults[name] then
      table.insert(fields, name)
      table.insert(fields, encoded)
    end
  end
  redis.call('HSET', (string.gsub(ARGV[1], '{id}', id)), unpack(fields))
  table.insert(ids, id)
end
redis.call('RPUSH', KEYS[1], unpack(ids))
redis.call('RPUSH', KEYS[2], unpack(ids))
return #ids
"""


class BatchStore:
    """All reads and writes of batches; job transitions go through `JobStore` so counts stay exact."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self.redis: redis.Redis = jobs.redis
        self._take = self.redis.register_script(_TAKE_LUA)
        self._create_items = self.redis.register_script(_CREATE_ITEMS_LUA)

    def create(self, batch: Batch, items: list[list[Any]]) -> None:
        """Store the batch and its items (rows of `batches.batch_items`); the batch becomes visible (and fed)
        only once everything is written."""
        shared_fields = {"model": batch.model, "created_at": batch.created_at, "batch_id": batch.id, "tenant": batch.tenant}
        common = json.dumps({name: json.dumps(value) for name, value in shared_fields.items()})
        job_key = redis_keys.job("{id}")
        item_fields = json.dumps(ITEM_FIELDS)
        defaults = json.dumps(omitted_defaults(ITEM_FIELDS))
        written: list[str] = []
        try:
            for start in range(0, len(items), CHUNK):
                chunk = items[start : start + CHUNK]
                written += [row[0] for row in chunk]
                self._create_items(
                    keys=[redis_keys.batch_jobs(batch.id), redis_keys.batch_pending(batch.id)], args=[job_key, common, json.dumps(chunk), item_fields, defaults]
                )
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(redis_keys.batch(batch.id), mapping=batch.to_redis())
            pipe.hset(redis_keys.batch_counts(batch.id), mapping={name: 0 for name in COUNT_NAMES} | {"queued": len(items)})
            pipe.zadd(redis_keys.tenant_batches(batch.tenant), {batch.id: batch.created_at})
            pipe.zadd(redis_keys.batch_deadlines(), {batch.id: batch.expires_at})
            pipe.rpush(redis_keys.active_batches(batch.model), batch.id)
            pipe.execute()
        except redis.RedisError as exc:
            self._undo(batch.id, written)
            raise Unavailable("the job store (Redis) failed while storing the batch; nothing was kept") from exc

    def _undo(self, batch_id: str, job_ids: list[str]) -> None:
        try:
            for start in range(0, len(job_ids), CHUNK):
                self.redis.delete(*[redis_keys.job(j) for j in job_ids[start : start + CHUNK]])
            self.redis.delete(redis_keys.batch_jobs(batch_id), redis_keys.batch_pending(batch_id), redis_keys.batch(batch_id))
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
        return batch.to_public(counts)

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
        return self.public(batch_id)

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

    def take_pending(self, model_name: str, n: int) -> tuple[list[str], str]:
        """Up to `n` pending items of `model_name`'s batches, round-robin, and the time they were noted as sent
        (see `_TAKE_LUA`; pass it on to `shared.broker.enqueue_many`)."""
        sent_at, job_ids = self._take(
            args=[redis_keys.active_batches(model_name), redis_keys.batch_pending("{id}"), redis_keys.sent(model_name), n]
        )
        return list(job_ids), str(sent_at)


def encode_result(result: dict[str, Any]) -> bytes:
    return json.dumps(result, ensure_ascii=False).encode() + b"\n"
