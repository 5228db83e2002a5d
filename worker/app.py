"""The worker's Celery app: one task per job on a thread pool, feeding one resident model through a microbatcher."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from celery import Celery, bootsteps, signals
from kombu import Queue

from shared import redis_keys
from shared.broker import ANSWER_TASK, make_celery
from shared.config import Settings
from shared.errors import RagqError
from worker import backlog, runtime
from worker.tasks import run_job

log = logging.getLogger(__name__)


class ReuseRedisClients(bootsteps.StartStopStep):
    """Kombu's Redis channel builds a new `redis.Redis` for every command it sends outside BRPOP: two per message
    (the unacked stash when it arrives, the ack), and building one costs more than the command (redis-py fills a
    dict of some 200 response callbacks each time). The consumer's channel gets one client per connection pool
    instead: a client is only a pool and its settings, safe to share between threads, and a new pool after a
    reconnect gets a new client."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        channel = getattr(c.task_consumer, "channel", None)
        if channel is not None and hasattr(channel, "Client") and not getattr(channel.Client, "ragq_reusing", False):
            channel.Client = _reusing_clients(channel, channel.Client)


def _reusing_clients(channel: Any, make: Callable[..., Any]) -> Callable[..., Any]:
    """`make`, but returning the same client while asked again for the channel's current (synchronous) pool."""
    held: list[Any] = [None, None]  # the pool, its client

    def client(**kwargs: Any) -> Any:
        pool = kwargs.get("connection_pool")
        if set(kwargs) != {"connection_pool"} or pool is None or pool is not getattr(channel, "_pool", None):
            return make(**kwargs)
        if held[0] is not pool:
            held[1] = make(**kwargs)
            held[0] = pool
        return held[1]

    client.ragq_reusing = True  # type: ignore[attr-defined]
    return client


def create_app(settings: Settings) -> Celery:
    """A Celery app that consumes only the queue of `settings.worker_spec`."""
    app = make_celery(settings)
    caps = runtime.microbatch_settings(settings)
    app.conf.update(
        # This worker's model's queues, interactive first (the broker's queue_order_strategy is "priority").
        task_default_queue=redis_keys.model_queue(settings.worker_spec.name),
        task_queues=(
            Queue(redis_keys.model_queue(settings.worker_spec.name)),
            Queue(redis_keys.model_batch_queue(settings.worker_spec.name)),
        ),
        # Threads, not processes: every job's task runs in the one process that holds the model, so
        # the microbatcher can put waiting jobs into one pipeline pass. Twice the microbatch size lets the
        # next microbatch fill while one runs. With prefetch 1 a worker reserves only as many messages as threads.
        worker_pool="threads",
        worker_concurrency=caps.thread_pool_size,
    )

    batch_queue = redis_keys.model_batch_queue(settings.worker_spec.name)

    @app.task(name=ANSWER_TASK, bind=True)
    def answer(self: Any, job_id: str) -> str | None:
        interactive = (self.request.delivery_info or {}).get("routing_key") != batch_queue
        status = run_job(runtime.current(settings, self.request.hostname), job_id, interactive)
        return None if status is None else status.value

    def load_before_consuming(sender: Any = None, **_: Any) -> None:
        # In the worker's own process before it consumes; the thread pool never forks.
        try:
            # Celery's node name is the worker's one name: jobs record it, the heartbeat carries it.
            resident = runtime.current(settings, getattr(sender, "hostname", None))
        except RagqError as exc:
            log.error("ragq worker: %s", exc.message)
            os._exit(2)
        # Batch items come straight from their batches, not as Celery messages (worker.backlog).
        backlog.start(resident)

    def note_received(request: Any = None, **_: Any) -> None:
        # In the consumer, the moment a message leaves Redis, before a pool thread runs its task.
        if request is None or not request.args:
            return
        resident = runtime.current(settings, request.hostname)
        job_id = request.args[0]
        if (request.delivery_info or {}).get("routing_key") != batch_queue:
            # From here until its task submits it, the next backlog microbatch waits for it (worker.handoff).
            resident.handoff.interactive_received(job_id)
        # A message this worker reserved but has not claimed yet is lost with the worker until the
        # visibility timeout; recording it lets the reaper send it again at once if the worker dies.
        runtime.note_reserved(resident, job_id)

    def stop_taking(**_: Any) -> None:
        # A warm shutdown has begun: like Celery's consumer, the backlog takes nothing more.
        backlog.stop_taking()

    def stop_model(**_: Any) -> None:
        # After Celery's warm shutdown has let the running tasks finish: the backlog gives back what has not
        # started and stores what has; then the engine process stops cleanly.
        backlog.stop(settings.task_time_limit_s)
        runtime.shutdown()

    app.steps["consumer"].add(ReuseRedisClients)
    signals.worker_init.connect(load_before_consuming, weak=False)
    signals.worker_shutting_down.connect(stop_taking, weak=False)
    signals.worker_shutdown.connect(stop_model, weak=False)
    signals.task_received.connect(note_received, weak=False)
    return app
