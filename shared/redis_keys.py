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
