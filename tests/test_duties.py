"""The worker's background duties: each on a thread of its own, the heartbeat never held up by another duty,
and the one loop that runs them outliving errors."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest
import redis

from shared import redis_keys
from shared.batch_store import BatchStore
from shared.batches import Batch, BatchStatus
from shared.config import Settings
from shared.store import JobStore
from worker.duties import Duties, PeriodicLoop, start_duties
from worker.expiry import Expiry
from worker.liveness import HEARTBEAT_TTL_S, Heartbeat

WORKER_NAME = "duties@test"


def unserved(settings: Settings) -> Settings:
    # A model no test worker serves, so these duties feed nothing that a running worker would take.
    return dataclasses.replace(settings, worker_model="unserved")


def stop_and_join(duties: Duties, timeout_s: float) -> None:
    duties.stop()
    for loop in duties.loops:
        loop.thread.join(timeout_s)
        assert not loop.thread.is_alive(), loop.thread.name


class SlowExpiry(Expiry):
    """An expiry whose every round takes `slow_s` seconds, as ending a few 100,000-item batches does."""

    def __init__(self, batches: BatchStore, slow_s: float) -> None:
        super().__init__(batches, every_s=0.05)
        self.slow_s = slow_s
        self.rounds = 0

    def step(self) -> bool:
        time.sleep(self.slow_s)
        self.rounds += 1
        return super().step()


@pytest.mark.slow
def test_heartbeat_never_lapses_while_another_duty_is_slower_than_its_ttl(
    settings: Settings, store: JobStore, redis_client: redis.Redis
) -> None:
    ttl_s, slow_s = 2, 3.0
    batches = BatchStore(store)
    batch = Batch.new("unserved", 1, "24h", None, None)
    batches.create(batch, [["00000000-0000-4000-8000-0000000000d1", "q", None, 5, {}, "1"]])
    redis_client.zadd(redis_keys.batch_deadlines(), {batch.id: time.time() - 1})
    duties = Duties.from_settings(unserved(settings), store, WORKER_NAME)
    duties.heartbeat = Heartbeat(redis_client, WORKER_NAME, ttl_s=ttl_s, every_s=0.2)
    slow_expiry = SlowExpiry(batches, slow_s)
    duties.expiry = slow_expiry
    alive = redis_keys.worker_alive(WORKER_NAME)
    duties.start()
    try:
        lapses = 0
        deadline = time.monotonic() + slow_s + 0.5
        while time.monotonic() < deadline:
            lapses += not redis_client.exists(alive)
            time.sleep(0.02)
        # The slow round really ran (and ended the batch) while the heartbeat was watched.
        assert slow_expiry.rounds >= 1
        assert batches.get(batch.id)[0].status is BatchStatus.EXPIRED
        assert lapses == 0
        assert 0 < redis_client.ttl(alive) <= ttl_s
    finally:
        stop_and_join(duties, timeout_s=slow_s + 2)


def test_start_duties_says_the_worker_is_alive_and_runs_each_duty_on_a_thread_of_its_own(
    settings: Settings, store: JobStore, redis_client: redis.Redis
) -> None:
    duties = start_duties(unserved(settings), store, WORKER_NAME)
    try:
        assert 0 < redis_client.ttl(redis_keys.worker_alive(WORKER_NAME)) <= HEARTBEAT_TTL_S
        names = [loop.thread.name for loop in duties.loops]
        assert names == ["ragq-heartbeat", "ragq-expiry", "ragq-callbacks", "ragq-reaper", "ragq-audit", "ragq-registry"]
        assert all(loop.thread.is_alive() and loop.thread.daemon for loop in duties.loops)
    finally:
        # Stopping does not wait for a loop's interval (the audit's is 10 s) to run out.
        stop_and_join(duties, timeout_s=2)


def test_a_loop_survives_failing_rounds_and_stops_on_its_event(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def step() -> bool:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise redis.ConnectionError("Redis is down")
        return False

    stop = threading.Event()
    loop = PeriodicLoop("ragq-test", step, every_s=0.01, stop=stop, error_pause_s=0.05)
    with caplog.at_level(logging.ERROR, logger="worker.duties"):
        loop.start()
        deadline = time.monotonic() + 5
        while len(calls) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stop.set()
        loop.thread.join(2)
    assert not loop.thread.is_alive()
    assert [r.getMessage() for r in caplog.records] == ["ragq-test: housekeeping error; retrying"] * 2
    # A failed round is followed by a pause, not a spin.
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.05


def test_a_loop_runs_again_at_once_while_its_step_reports_more_work() -> None:
    calls = []

    def step() -> bool:
        calls.append(time.monotonic())
        return len(calls) < 5

    stop = threading.Event()
    loop = PeriodicLoop("ragq-test", step, every_s=60, stop=stop)
    loop.start()
    deadline = time.monotonic() + 5
    while len(calls) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)
    stop.set()
    loop.thread.join(2)
    # Four busy rounds back to back, then the fifth reported none left: the next waits the interval.
    assert len(calls) == 5
