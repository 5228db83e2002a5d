"""Scale-out: the housekeeping Redis load per worker stays constant as workers are added."""

from __future__ import annotations

import json
import time

import redis

import pytest

from shared import redis_keys
from shared.broker import make_celery
from shared.config import Settings
from shared.jobs import Job, JobStatus
from shared.store import JobStore
from tests.conftest import empty_redis
from worker.liveness import Reaper


@pytest.fixture(autouse=True)
def no_heartbeats_left(redis_client: redis.Redis) -> object:
    """Heartbeats outlive the per-test flush (see conftest.empty_redis): remove this file's fake ones."""
    yield
    for key in redis_client.keys(redis_keys.worker_alive("scale-*")):
        redis_client.delete(key)


def redis_commands(client: redis.Redis) -> int:
    """Commands Redis has run so far, those run inside scripts included (INFO commandstats)."""
    return sum(int(stats["calls"]) for stats in client.info("commandstats").values())


def fleet(store: JobStore, settings: Settings, workers: int, jobs_each: int) -> list[Reaper]:
    """`workers` live workers, each running `jobs_each` jobs; one reaper per worker."""
    pipe = store.redis.pipeline(transaction=False)
    for w in range(workers):
        name = f"scale-w{w}@h"
        pipe.set(redis_keys.worker_alive(name), "1", ex=60)
        for j in range(jobs_each):
            job = Job(id=f"{name}-{j}", status=JobStatus.QUEUED, question="q", model="unserved", created_at=time.time())
            pipe.hset(redis_keys.job(job.id), mapping=job.to_redis())
    pipe.execute()
    for w in range(workers):
        for j in range(jobs_each):
            assert store.transition(f"scale-w{w}@h-{j}", JobStatus.RUNNING, worker=f"scale-w{w}@h", started_at=time.time()).applied
    celery = make_celery(settings)
    return [Reaper(store, celery, f"scale-w{w}@h", max_attempts=3, task_time_limit_s=60) for w in range(workers)]


def housekeeping_commands_per_worker(store: JobStore, settings: Settings, workers: int, jobs_each: int) -> float:
    """Redis commands per worker of one housekeeping period: every worker's reaper steps once."""
    reapers = fleet(store, settings, workers, jobs_each)
    for key in (redis_keys.reaper_turn(), redis_keys.overdue_turn()):
        store.redis.delete(key)
    before = redis_commands(store.redis)
    for reaper in reapers:
        reaper.step()
    # The INFO call itself counts one.
    return (redis_commands(store.redis) - before - 1) / workers


def test_housekeeping_redis_load_per_worker_does_not_grow_with_the_number_of_workers(
    store: JobStore, settings: Settings, redis_client: redis.Redis
) -> None:
    few = housekeeping_commands_per_worker(store, settings, 8, 4)
    empty_redis(redis_client)
    many = housekeeping_commands_per_worker(store, settings, 48, 4)
    # Each reaper reading every worker's jobs made this six times as much (a load quadratic in workers).
    assert many < 1.5 * few, (few, many)


def test_one_reaper_per_period_takes_the_turn(store: JobStore, settings: Settings, redis_client: redis.Redis) -> None:
    reapers = fleet(store, settings, 3, 1)
    # A dead worker's job: whichever reaper has the turn sends it again, once.
    store.redis.delete(redis_keys.worker_alive("scale-w2@h"))
    for reaper in reapers[:2]:
        reaper.step()
    assert redis_client.get(redis_keys.reaper_turn()) == "scale-w0@h"
    assert redis_client.llen(redis_keys.model_queue("unserved")) == 1
    assert json.loads(redis_client.hget(redis_keys.job("scale-w2@h-0"), "worker")) == "scale-w2@h"
    # The turn passes on once its period is over.
    redis_client.delete(redis_keys.reaper_turn())
    reapers[1].step()
    assert redis_client.get(redis_keys.reaper_turn()) == "scale-w1@h"


def test_reaper_turn_key_formats() -> None:
    assert redis_keys.reaper_turn() == "ragq:reaper:turn"
    assert redis_keys.overdue_turn() == "ragq:reaper:overdue-turn"
