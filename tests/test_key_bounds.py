"""Housekeeping keys stay bounded: entries of long-gone workers are dropped, a tenant's batch index expires."""

from __future__ import annotations

import json
import time

import redis

from shared import redis_keys
from shared.store import WORKER_ENTRY_KEEP_S, announce_worker


def test_announcing_a_worker_drops_long_gone_workers_but_keeps_live_and_recent_ones(redis_client: redis.Redis) -> None:
    old = json.dumps({"model": "m", "ready_at": time.time() - WORKER_ENTRY_KEEP_S - 10})
    for i in range(50):
        redis_client.hset(redis_keys.workers(), f"gone-{i}", old)
    redis_client.hset(redis_keys.workers(), "old-but-alive", old)
    redis_client.set(redis_keys.worker_alive("old-but-alive"), "1", ex=60)
    try:
        announce_worker(redis_client, "recent", "m")
        assert set(redis_client.hkeys(redis_keys.workers())) == {"old-but-alive", "recent"}
    finally:
        # A heartbeat survives `empty_redis` (it stands for a live session worker): this made-up one must not.
        redis_client.delete(redis_keys.worker_alive("old-but-alive"))
