"""The Celery app both sides build from the settings. The API only sends tasks by name through it."""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery

from shared import redis_keys
from shared.lua import with_now
from shared.config import Settings
from shared.jobs import Job
from shared.redis_client import sentinel_kwargs
from shared.redis_url import is_sentinel, parse_sentinel_url

ANSWER_TASK = "ragq.answer"


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for at-least-once delivery of JSON messages over Redis."""
    app = Celery("ragq", broker=broker_url(settings), set_as_current=False)
    app.conf.update(
        # JSON only: a pickle message is refused before anything of it runs.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        # Results live in our own job records; Celery's result backend stays off.
        task_ignore_result=True,
        # Acknowledge after the job's result is stored, and give a message back to the queue when
        # the process running it dies, so a killed worker loses nothing.
        # https://docs.celeryq.dev/en/stable/userguide/configuration.html#task-acks-late
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A worker reserves only what it runs: jobs left in Redis can go to any idle worker.
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(1, settings.task_time_limit_s - 5),
        # Redis redelivers an unacknowledged message after this; it must outlast the time limit
        # (Settings enforces that) or long jobs run twice.
        # https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/redis.html#visibility-timeout
        # queue_order_strategy "priority": a worker reads its model's interactive queue before its batch queue
        # on every fetch, instead of Kombu's default round robin.
        broker_transport_options=broker_transport_options(settings),
        # Off: the thread pool cannot cancel a task, and Celery treats the attempt as unrecoverable and stops
        # the worker on every broker reconnect (bench.chaos showed workers dying at a Redis restart and the
        # jobs they held timing out). Running tasks finish and store their results instead; their messages,
        # no longer acknowledgeable, are skipped when redelivered because the jobs are final by then.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        # The API must answer 503 quickly when Redis is down instead of retrying for long.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        task_default_queue=redis_keys.model_queue(settings.default_model.name),
        worker_hijack_root_logger=False,
    )
    return app


def broker_url(settings: Settings) -> str:
    """The broker URL Kombu wants: REDIS_URL, or for `sentinel://` one Kombu sentinel URL per sentinel."""
    url = settings.effective_redis_url
    return parse_sentinel_url(url).kombu_url() if is_sentinel(url) else url


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Kombu's Redis transport options; with Sentinel also the master's name and how to log in to the sentinels."""
    options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s, "queue_order_strategy": "priority"}
    if is_sentinel(settings.effective_redis_url):
        # Kombu's sentinel transport asks these sentinels for `master_name` on every (re)connection, so a
        # worker's consumer follows a failover when Celery re-establishes its broker connection.
        # https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/redis.html#configuration
        options["master_name"] = settings.sentinel_master
        options["sentinel_kwargs"] = sentinel_kwargs(settings.sentinel_password)
    return options


# KEYS[1] the model's sent set; ARGV job ids. Scores them with Redis's clock, the one clock every sender shares.
_MARK_SENT_LUA = with_now("""
local now = now()
for _, id in ipairs(ARGV) do redis.call('ZADD', KEYS[1], now, id) end
return tostring(now)
""")

# Message header carrying the time `mark_sent` gave the message: the audit reads it off the oldest message
# of a queue to tell whether a job's message has left it (see `worker.audit`).
SENT_HEADER = "ragq_sent"

def mark_sent(client: redis.Redis, model_name: str, job_ids: list[str]) -> str:
    """Note the jobs as sent now (Redis's clock; returned): from here on the message audit sees they get a message."""
    return str(client.register_script(_MARK_SENT_LUA)(keys=[redis_keys.sent(model_name)], args=job_ids))


def enqueue(
    app: Celery, client: redis.Redis, job_id: str, model_name: str, *, batch_item: bool = False, sent_at: str | None = None
) -> None:
    """Put a job on its model's queue (interactive or batch), by task name, so the API never imports worker code;
    first noted as sent (unless the caller did: `sent_at` from `mark_sent`), so the message audit can find it if
    the message is lost (see `worker.audit`)."""
    if sent_at is None:
        sent_at = mark_sent(client, model_name, [job_id])
    queue = redis_keys.model_batch_queue(model_name) if batch_item else redis_keys.model_queue(model_name)
    app.send_task(ANSWER_TASK, args=[job_id], queue=queue, headers={SENT_HEADER: sent_at})


def send_again(app: Celery, client: redis.Redis, job: Job, *, sent_at: str | None = None) -> None:
    """Send a new message for `job` to its model's interactive or batch queue, as its first one went (noted as
    sent unless the caller did: `sent_at`)."""
    enqueue(app, client, job.id, job.model, batch_item=job.batch_id is not None, sent_at=sent_at)
