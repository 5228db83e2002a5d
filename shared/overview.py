"""The operator's picture of each served model, read from Redis in a bounded number of round trips.

What `GET /v1/models` returns and `ragq status` shows: the live workers of each model (from the registry that
`worker.registry` keeps), queue depths, throughput per 10 s bucket, and, for the caller's tenant only, its open
batches with their progress and ETA and its recent failures. Nothing here scans jobs: every figure comes from a
key of bounded size (a queue's length, a batch's counts, a counter per 10 s bucket, a capped list).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis

from shared import redis_keys
from shared.batches import ENDED, Batch

# Counters are kept per bucket of this many seconds (a hash or string per bucket, expiring on its own).
BUCKET_S = 10
# The throughput chart's span.
THROUGHPUT_WINDOW_S = 15 * 60
# A bucket counter lives this long after its last increment: just longer than the chart's span.
BUCKET_TTL_S = THROUGHPUT_WINDOW_S + 2 * BUCKET_S
# A batch's drain rate (and so its ETA) is measured over this window.
RATE_WINDOW_S = 60
BATCH_BUCKET_TTL_S = RATE_WINDOW_S + 2 * BUCKET_S
# Recent failures kept per tenant and model, and how long such a list lives after its last failure.
MAX_RECENT_FAILURES = 20
FAILURES_TTL_S = 7 * 24 * 3600
# Open batches read per request at most (a tenant's open batches are capped by RAGQ_MAX_OPEN_BATCHES anyway).
MAX_LISTED_BATCHES = 1000


def bucket_of(t: float) -> int:
    """The start (Unix seconds) of the 10 s bucket holding time `t`."""
    return int(t // BUCKET_S) * BUCKET_S


def recent_buckets(now: float, window_s: int) -> list[int]:
    """Starts of the buckets covering the last `window_s` seconds up to `now`, oldest first (the current one last)."""
    last = bucket_of(now)
    return list(range(last - (window_s // BUCKET_S - 1) * BUCKET_S, last + 1, BUCKET_S))


def live_workers(client: redis.Redis) -> list[dict[str, Any]]:
    """Every registered worker whose registration has not expired, by name."""
    names = sorted(client.zrange(redis_keys.live_workers(), 0, -1))
    if not names:
        return []
    infos = client.mget([redis_keys.worker_info(name) for name in names])
    return [json.loads(raw) for raw in infos if raw is not None]


def queue_depths(client: redis.Redis, model_name: str, workers: Iterable[str]) -> dict[str, int]:
    """Interactive jobs waiting in the model's queue; batch items not yet taken by a worker (in their batch's
    pending list or on the model's batch queue); jobs taken by the model's live workers (running, or reserved)."""
    active = client.lrange(redis_keys.active_batches(model_name), 0, MAX_LISTED_BATCHES - 1)
    workers = list(workers)
    pipe = client.pipeline(transaction=False)
    pipe.llen(redis_keys.model_queue(model_name))
    pipe.llen(redis_keys.model_batch_queue(model_name))
    for batch_id in dict.fromkeys(active):
        pipe.llen(redis_keys.batch_pending(batch_id))
    for name in workers:
        pipe.scard(redis_keys.worker_jobs(name))
    replies = pipe.execute()
    pending = replies[2 : len(replies) - len(workers)]
    return {
        "interactive_queued": int(replies[0]),
        "backlog_pending": int(replies[1]) + sum(int(n) for n in pending),
        "running": sum(int(n) for n in replies[len(replies) - len(workers) :]) if workers else 0,
    }


def throughput(client: redis.Redis, model_name: str, now: float) -> list[dict[str, int]]:
    """Items of the model that ended per 10 s bucket over the last 15 minutes, oldest first."""
    buckets = recent_buckets(now, THROUGHPUT_WINDOW_S)
    pipe = client.pipeline(transaction=False)
    for bucket in buckets:
        pipe.hmget(redis_keys.model_finished(model_name, bucket), "succeeded", "failed")
    points = []
    for bucket, (succeeded, failed) in zip(buckets, pipe.execute(), strict=True):
        ok, bad = int(succeeded or 0), int(failed or 0)
        points.append({"t": bucket, "items": ok + bad, "failed": bad})
    return points


def items_per_s(points: list[dict[str, int]], now: float, window_s: float = RATE_WINDOW_S, since: float | None = None) -> float:
    """Items per second over the last `window_s` seconds of `points` (the current bucket counted up to `now`);
    a batch younger than the window is measured from `since`, when it started."""
    start = now - window_s if since is None else max(now - window_s, since)
    items = sum(point["items"] for point in points if point["t"] + BUCKET_S > start)
    # Whole buckets are counted, so the span starts at the first one's start, not at `start`.
    first = bucket_of(start)
    span_s = max(now - first, 1.0)
    return items / span_s


def tenant_open_batches(client: redis.Redis, tenant: str, model_name: str, now: float) -> list[dict[str, Any]]:
    """The tenant's batches for `model_name` that have not ended, with progress, drain rate and ETA, oldest first."""
    members = client.zrangebyscore(redis_keys.tenant_stored_batches(tenant), "+inf", "+inf", start=0, num=MAX_LISTED_BATCHES)
    batch_ids = [member.rsplit(":", 1)[0] for member in members]
    if not batch_ids:
        return []
    buckets = recent_buckets(now, RATE_WINDOW_S)
    pipe = client.pipeline(transaction=False)
    for batch_id in batch_ids:
        pipe.hgetall(redis_keys.batch(batch_id))
        pipe.hgetall(redis_keys.batch_counts(batch_id))
        pipe.mget([redis_keys.batch_finished(batch_id, bucket) for bucket in buckets])
    replies = pipe.execute()
    batches = []
    for i in range(len(batch_ids)):
        fields, counts, finished = replies[3 * i : 3 * i + 3]
        if not fields:
            continue
        batch = Batch.from_redis(fields)
        if batch.model != model_name or batch.tenant != tenant or batch.status in ENDED:
            continue
        points = [{"t": bucket, "items": int(n or 0)} for bucket, n in zip(buckets, finished, strict=True)]
        batches.append(batch_progress(batch, {k: int(v) for k, v in counts.items()}, points, now))
    batches.sort(key=lambda b: b["created_at"])
    return batches


def batch_progress(batch: Batch, counts: dict[str, int], points: list[dict[str, int]], now: float) -> dict[str, Any]:
    """One open batch as the overview shows it: counts, progress 0..1, items/s over the last minute, ETA."""
    completed = counts.get("succeeded", 0)
    failed = counts.get("failed", 0)
    ended = completed + failed + counts.get("cancelled", 0) + counts.get("expired", 0)
    rate = items_per_s(points, now, since=batch.in_progress_at or batch.created_at)
    left = max(0, batch.total - ended)
    return {
        "id": batch.id,
        "status": batch.status.value,
        "total": batch.total,
        "completed": completed,
        "failed": failed,
        "progress": round(ended / batch.total, 4) if batch.total else 0.0,
        "items_per_s": round(rate, 3),
        "eta_s": round(left / rate, 1) if rate > 0 else (0.0 if left == 0 else None),
        "created_at": int(batch.created_at),
    }


def recent_failures(client: redis.Redis, tenant: str, model_name: str) -> list[dict[str, Any]]:
    """The tenant's most recent failed jobs on `model_name`, newest first."""
    raw = client.lrange(redis_keys.tenant_failures(tenant, model_name), 0, MAX_RECENT_FAILURES - 1)
    return [json.loads(entry) for entry in raw]


# The worker fields a model's entry lists (the registry holds a few more, such as the model).
WORKER_FIELDS = (
    "name", "host", "pid", "device", "dtype", "max_batch_size", "max_batch_tokens", "engine", "engine_restarts",
    "up_since", "jobs_done", "items_per_s", "last_error",
)


def model_entry(
    client: redis.Redis, model_name: str, workers: list[dict[str, Any]], tenant: str, now: float, created: int
) -> dict[str, Any]:
    """One model as `GET /v1/models` returns it (OpenAI's model object with ragq's fields added)."""
    mine = [{name: worker.get(name) for name in WORKER_FIELDS} for worker in workers if worker.get("model") == model_name]
    up_since = [int(w["up_since"]) for w in mine if w.get("up_since")]
    return {
        "id": model_name,
        "object": "model",
        "created": min(up_since) if up_since else created,
        "owned_by": "ragq",
        "workers": mine,
        "queues": queue_depths(client, model_name, [w["name"] for w in mine]),
        "throughput": throughput(client, model_name, now),
        "batches": tenant_open_batches(client, tenant, model_name, now),
        "recent_failures": recent_failures(client, tenant, model_name),
    }


def models_overview(
    client: redis.Redis, model_names: Iterable[str], tenant: str, created: int, now: float | None = None
) -> list[dict[str, Any]]:
    """Every model in `model_names`, in that order."""
    now = time.time() if now is None else now
    workers = live_workers(client)
    return [model_entry(client, name, workers, tenant, now, created) for name in model_names]
