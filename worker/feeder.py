"""Feeds a model's batch queue from its active batches.

Guarantees: the batch queue (`ragq.model.<m>.batch`) holds at most `feed_depth` messages put there by feeders,
so interactive traffic is never behind the backlog in Redis and a newly submitted batch starts within one feed
depth; items are taken round-robin over the model's active batches, one from each per turn, so one large batch
does not starve the others. Every taken item is noted as sent in the same Lua call that takes it, so an item
whose feeder dies before sending it is sent by the message audit (`worker.audit`), never lost. Several workers
may feed at once: taking is atomic, and at worst the queue overshoots by what they take in the same instant.
"""

from __future__ import annotations

from celery import Celery

from shared import redis_keys
from shared.batch_store import BatchStore
from shared.broker import enqueue_many

# When the queue is full or nothing is pending, look again after this long; while items flow, at once.
FEED_IDLE_S = 0.2


class Feeder:
    """Tops up one model's batch queue from the pending lists of its active batches."""

    thread_name = "ragq-feeder"
    first_wait_s = 0.0

    def __init__(
        self, batches: BatchStore, celery: Celery, model_name: str, feed_depth: int, every_s: float = FEED_IDLE_S
    ) -> None:
        self.batches = batches
        self.redis = batches.redis
        self.celery = celery
        self.model_name = model_name
        self.feed_depth = feed_depth
        self.every_s = every_s

    def step(self) -> bool:
        """Feed once; True when items were sent (more may be waiting)."""
        return self.feed_once() > 0

    def feed_once(self) -> int:
        """Top the batch queue up to `feed_depth` messages, round-robin over active batches."""
        room = self.feed_depth - int(self.redis.llen(redis_keys.model_batch_queue(self.model_name)))
        if room <= 0:
            return 0
        job_ids, sent_at = self.batches.take_pending(self.model_name, room)
        enqueue_many(self.celery, self.redis, job_ids, self.model_name, batch_item=True, sent_at=sent_at)
        return len(job_ids)
