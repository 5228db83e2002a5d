"""Every Redis key and channel ragq uses, built here and nowhere else."""

from __future__ import annotations

PREFIX = "ragq"


def job(job_id: str) -> str:
    """Hash holding one job's record."""
    return f"{PREFIX}:job:{job_id}"


def job_events(job_id: str) -> str:
    """Pub/sub channel announcing each status change of one job (long-polls listen here)."""
    return f"{PREFIX}:job:{job_id}:events"


def all_job_events() -> str:
    """Pub/sub pattern matching every job's events channel (one subscription per API process)."""
    return f"{PREFIX}:job:*:events"


def job_id_of_events(channel: str) -> str:
    """The job id in a `job_events` channel name."""
    return channel[len(f"{PREFIX}:job:") : -len(":events")]


def model_queue(model_name: str) -> str:
    """Celery queue (a Redis list of the same name) holding the jobs of one served model."""
    return f"{PREFIX}.model.{model_name}"


def workers() -> str:
    """Hash of worker processes that have loaded their model: worker name -> JSON {model, ready_at}."""
    return f"{PREFIX}:workers"


def model_batch_queue(model_name: str) -> str:
    """Celery queue for batch items of one model; workers read it only when the interactive queue is empty."""
    return f"{PREFIX}.model.{model_name}.batch"


def batch(batch_id: str) -> str:
    """Hash holding one batch's record."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_counts(batch_id: str) -> str:
    """Hash of a batch's item counts by status; moved in the same script as each item's status."""
    return f"{PREFIX}:batch:{batch_id}:counts"


def batch_jobs(batch_id: str) -> str:
    """List of a batch's job ids in input order (results are read in this order)."""
    return f"{PREFIX}:batch:{batch_id}:jobs"


def batch_pending(batch_id: str) -> str:
    """List of a batch's job ids not yet handed to the workers' queue."""
    return f"{PREFIX}:batch:{batch_id}:pending"


def batch_events(batch_id: str) -> str:
    """Pub/sub channel announcing a batch's end."""
    return f"{PREFIX}:batch:{batch_id}:events"


def active_batches(model_name: str) -> str:
    """List of a model's batches with items still pending; the feeder rotates through it round-robin."""
    return f"{PREFIX}:batches:active:{model_name}"


def callbacks() -> str:
    """Sorted set of batch ids whose callback is due, scored by the time of the next attempt."""
    return f"{PREFIX}:callbacks"


def idempotency(kind: str, key_hash: str) -> str:
    """String remembering which object an Idempotency-Key created (kind: `job` or `batch`)."""
    return f"{PREFIX}:idempotency:{kind}:{key_hash}"


def batch_deadlines() -> str:
    """Sorted set of unfinished batch ids by the end of their completion window."""
    return f"{PREFIX}:batches:deadlines"


def callback_attempts() -> str:
    """Hash: batch id -> failed callback deliveries so far."""
    return f"{PREFIX}:callbacks:attempts"


def worker_alive(worker: str) -> str:
    """Heartbeat of one worker process; expires a few seconds after the process stops refreshing it."""
    return f"{PREFIX}:worker:{worker}:alive"


def worker_jobs(worker: str) -> str:
    """Set of the jobs one worker process is running (kept by the transition script)."""
    return f"{PREFIX}:worker:{worker}:jobs"


def workers_with_jobs() -> str:
    """Set of worker names that have a `worker_jobs` set: where the reaper looks for dead workers' jobs."""
    return f"{PREFIX}:workers:with-jobs"


def reaper_turn() -> str:
    """String held for one reaper period by the worker whose turn it is to look for dead workers (SET NX PX)."""
    return f"{PREFIX}:reaper:turn"


def overdue_turn() -> str:
    """String held for one overdue period by the worker whose turn it is to look for overdue jobs (SET NX PX)."""
    return f"{PREFIX}:reaper:overdue-turn"


def sent(model_name: str) -> str:
    """Sorted set of `model_name`'s jobs whose message was sent and not yet taken, scored by the Redis time of
    the last send: where the message audit looks for messages that never reached a worker."""
    return f"{PREFIX}:sent:{model_name}"


def broker_unacked() -> str:
    """Kombu's hash of delivered, unacknowledged messages (its default name; ragq sets no key prefix)."""
    return "unacked"


def broker_unacked_index() -> str:
    """Kombu's sorted set of the delivery times of the messages in `broker_unacked`."""
    return "unacked_index"


def tenant_outstanding(tenant: str) -> str:
    """Count of a tenant's queued and running jobs: reserved by the API, released by the final transition."""
    return f"{PREFIX}:tenant:{tenant}:outstanding"


def tenant_rate(tenant: str, minute: int) -> str:
    """Requests of a tenant in one minute (Unix time // 60); expires after two."""
    return f"{PREFIX}:tenant:{tenant}:rate:{minute}"


def tenant_batches(tenant: str) -> str:
    """Sorted set of a tenant's batch ids by creation time: `GET /v1/batches`."""
    return f"{PREFIX}:tenant:{tenant}:batches"


def tenant_stored_batches(tenant: str) -> str:
    """Sorted set of a tenant's stored batches as `<batch id>:<items>`, scored by when their items expire
    (+inf while the batch is open): the open-batch and stored-item caps are read from it."""
    return f"{PREFIX}:tenant:{tenant}:stored-batches"


def tenant_stored_items(tenant: str) -> str:
    """Count of the items of the batches in `tenant_stored_batches`."""
    return f"{PREFIX}:tenant:{tenant}:stored-items"


# -- The live picture (`GET /v1/models`, `ragq status`): the worker registry and bounded activity counters. --


def live_workers() -> str:
    """Sorted set of registered worker names, scored by when their registration runs out (the worker's clock);
    registrations themselves are `worker_info` keys with a TTL, so a name whose key is gone is a dead worker."""
    return f"{PREFIX}:workers:live"


def worker_info(worker: str) -> str:
    """JSON of one live worker (model, device, caps, engine state, counters); expires when it stops refreshing it."""
    return f"{PREFIX}:worker:{worker}:info"


def model_finished(model_name: str, bucket: int) -> str:
    """Hash `succeeded`/`failed` -> items of `model_name` that ended in one 10 s bucket (Unix time // 10 * 10)."""
    return f"{PREFIX}:model:{model_name}:finished:{bucket}"


def batch_finished(batch_id: str, bucket: int) -> str:
    """Items of one batch that ended in one 10 s bucket: its drain rate, for the ETA."""
    return f"{PREFIX}:batch:{batch_id}:finished:{bucket}"


def tenant_failures(tenant: str, model_name: str) -> str:
    """List of a tenant's most recent failed jobs on one model (JSON, newest first, capped)."""
    return f"{PREFIX}:tenant:{tenant}:failures:{model_name}"


# --- OpenAI-compatible files (api/files.py, shared/files.py) ---


def file(file_id: str) -> str:
    """Hash of an uploaded file's metadata (tenant, filename, bytes, purpose, created_at)."""
    return f"{PREFIX}:file:{file_id}"


def file_chunks(file_id: str) -> str:
    """List of an uploaded file's content, in order, as UTF-8 text chunks of at most 64 KiB each."""
    return f"{PREFIX}:file:{file_id}:chunks"


def tenant_files(tenant: str) -> str:
    """Sorted set of a tenant's files as `<file id>:<bytes>`, scored by when they expire: the per-tenant caps
    (files, bytes) are read from it and `GET /v1/files` lists it."""
    return f"{PREFIX}:tenant:{tenant}:files"

# Replication barrier (shared.redis_client.wait_for_replicas): a PUBLISH here before WAIT makes WAIT cover every
# write made so far, whichever connection made it. Nobody subscribes.
def replication_barrier() -> str:
    """Pub/sub channel written to (and never read) to move a connection's replication offset to the newest write."""
    return f"{PREFIX}:replication-barrier"

# Usage per tenant (shared/usage.py): written by the job transition script when a job succeeds.
USAGE_GRANULARITIES = ("hour", "day")


def usage_bucket(tenant: str, granularity: str, start: int | str) -> str:
    """Hash of a tenant's usage in one hour or day (`start`: its first second, Unix time, UTC), field
    `<figure>:<model>`; expires after the granularity's retention (`shared.usage.RETENTION_S`)."""
    return f"{PREFIX}:usage:{tenant}:{granularity}:{start}"


def usage_total(tenant: str) -> str:
    """Hash of a tenant's usage since Redis's data began, fields as `usage_bucket`'s: the Prometheus counters."""
    return f"{PREFIX}:usage:{tenant}:total"


def usage_tenants() -> str:
    """Set of the tenants that have usage: where an admin's `/v1/usage` and the metrics look."""
    return f"{PREFIX}:usage:tenants"
