"""Faults: a worker killed mid-batch loses nothing, a poison job ends failed, pickle messages never run."""

from __future__ import annotations

import json
import os
import pickle
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from kombu import Connection, Exchange, Queue

from shared import redis_keys
from shared.batch_store import BatchStore
from shared.batches import Batch
from shared.broker import SENT_HEADER, enqueue, make_celery
from shared.config import Settings
from shared.jobs import Job, JobStatus
from shared.store import JobStore
from tests.helpers import WorkerProcess, start_worker
from worker.audit import MessageAudit
from worker.liveness import Reaper

SLOW = {"max_new_tokens": 300, "min_new_tokens": 300, "num_beams": 4}


def reaper(store: JobStore, settings: Settings, worker_name: str = "reaper@test") -> Reaper:
    return Reaper(store, make_celery(settings), worker_name, max_attempts=3)


def message_audit(store: JobStore, settings: Settings) -> MessageAudit:
    return MessageAudit(store, make_celery(settings), "unserved")


def running_job(store: JobStore, job_id: str, worker: str, attempts: int) -> None:
    store.create(Job(id=job_id, status=JobStatus.QUEUED, question="q", model="unserved", created_at=time.time()))
    for _ in range(attempts):
        assert store.transition(job_id, JobStatus.RUNNING, worker=worker, started_at=time.time()).applied


def test_transitions_track_the_jobs_each_worker_runs(store: JobStore) -> None:
    running_job(store, "j1", "w1@h", 1)
    assert store.redis.smembers(redis_keys.worker_jobs("w1@h")) == {"j1"}
    store.transition("j1", JobStatus.RUNNING, worker="w2@h")
    assert store.redis.smembers(redis_keys.worker_jobs("w1@h")) == set()
    assert store.redis.smembers(redis_keys.worker_jobs("w2@h")) == {"j1"}
    store.transition("j1", JobStatus.SUCCEEDED)
    assert store.redis.smembers(redis_keys.worker_jobs("w2@h")) == set()


def test_reaper_requeues_a_dead_workers_jobs_and_fails_exhausted_ones(
    store: JobStore, settings: Settings, redis_client: redis.Redis
) -> None:
    running_job(store, "fresh", "dead@h", 1)
    running_job(store, "poison", "dead@h", 3)
    running_job(store, "other", "alive@h", 1)
    # Reserved by the dead worker, never claimed.
    store.create(Job(id="reserved", status=JobStatus.QUEUED, question="q", model="unserved", created_at=time.time()))
    redis_client.sadd(redis_keys.worker_jobs("dead@h"), "reserved")
    redis_client.set(redis_keys.worker_alive("alive@h"), "1", ex=10)
    requeued = reaper(store, settings).reap_dead_workers()
    assert sorted(requeued) == ["fresh", "reserved"]
    assert redis_client.llen(redis_keys.model_queue("unserved")) == 2
    assert store.get("fresh").status is JobStatus.RUNNING
    poison = store.get("poison")
    assert poison.status is JobStatus.FAILED
    assert poison.error == {"type": "worker_lost", "message": "the worker running this job died 3 times; not retried"}
    assert store.get("other").status is JobStatus.RUNNING
    assert redis_client.smembers(redis_keys.workers_with_jobs()) == {"alive@h"}
    # A second reaper finds nothing left to do.
    assert reaper(store, settings, "other-reaper@test").reap_dead_workers() == []


def kill_group(worker: WorkerProcess) -> None:
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait()


@pytest.mark.slow
def test_jobs_of_a_worker_killed_mid_batch_are_completed_by_another(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    first = start_worker(settings, "tiny-t5-chaos", redis_client)
    try:
        jobs = [
            client.post("/v1/jobs", json={"question": f"How do I scale? {i}", "model": "tiny-t5-chaos", "params": SLOW}).get_json()
            for i in range(4)
        ]
        deadline = time.monotonic() + 30
        ids = {j["id"] for j in jobs}

        def held() -> set[str]:
            return set().union(*[redis_client.smembers(redis_keys.worker_jobs(w)) for w in redis_client.smembers(redis_keys.workers_with_jobs())])

        # Kill once the worker has recorded every message it took (a message taken and not yet recorded
        # when a worker dies waits for the visibility timeout instead: a known, narrow window).
        while not (ids <= held() and any(client.get(f"/v1/jobs/{j}").get_json()["status"] == "running" for j in ids)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        kill_group(first)
    finally:
        first.stop()
    second = start_worker(settings, "tiny-t5-chaos", redis_client)
    try:
        done = [client.get(f"/v1/jobs/{j['id']}?wait=60").get_json() for j in jobs]
        assert [j["status"] for j in done] == ["succeeded"] * 4, done
        assert max(j["attempts"] for j in done) >= 2
        assert {j["worker"] for j in done} == {done[0]["worker"]}
    finally:
        second.stop()


class Touch:
    """Unpickling this creates a file: proof that a pickle payload was (or was not) deserialised."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_pickle_message_is_refused_and_nothing_of_it_runs(
    client: FlaskClient, t5_worker: WorkerProcess, settings: Settings, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    queue_name = redis_keys.model_queue("tiny-t5")
    exchange = Exchange(queue_name, type="direct")
    with Connection(settings.redis_url) as connection:
        producer = connection.Producer()
        producer.publish(
            pickle.dumps(((Touch(marker),), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})),
            exchange=exchange,
            routing_key=queue_name,
            declare=[Queue(queue_name, exchange, routing_key=queue_name)],
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"lang": "py", "task": "ragq.answer", "id": "pickled-1", "argsrepr": "()", "kwargsrepr": "{}"},
        )
    sentinel = client.post("/v1/jobs", json={"question": "still alive?", "params": {"max_new_tokens": 2}}).get_json()
    assert client.get(f"/v1/jobs/{sentinel['id']}?wait=60").get_json()["status"] == "succeeded"
    time.sleep(0.5)
    assert not marker.exists()
    assert "untrusted content" in t5_worker.log() or "ContentDisallowed" in t5_worker.log()


def test_job_running_past_the_time_limit_under_a_live_worker_is_requeued(
    store: JobStore, settings: Settings, redis_client: redis.Redis
) -> None:
    running_job(store, "stuck", "alive@h", 1)
    running_job(store, "recent", "alive@h", 1)
    redis_client.set(redis_keys.worker_alive("alive@h"), "1", ex=10)
    store.redis.hset(redis_keys.job("stuck"), "started_at", json.dumps(time.time() - 1000))
    overdue_reaper = Reaper(store, make_celery(settings), "me@h", max_attempts=3, task_time_limit_s=60)
    assert overdue_reaper.requeue_overdue() == ["stuck"]
    assert redis_client.llen(redis_keys.model_queue("unserved")) == 1
    assert redis_client.smembers(redis_keys.worker_jobs("alive@h")) == {"recent"}
    # The live worker's claim was given up, so the re-sent message's claim goes through.
    assert store.transition("stuck", JobStatus.RUNNING, worker="me@h").applied
    assert not store.transition("recent", JobStatus.RUNNING, worker="me@h").applied


def queued_job(store: JobStore, job_id: str) -> None:
    store.create(Job(id=job_id, status=JobStatus.QUEUED, question="q", model="unserved", created_at=time.time()))


def test_message_audit_sends_again_a_message_taken_from_the_queue_but_never_delivered(
    store: JobStore, settings: Settings, redis_client: redis.Redis
) -> None:
    # Kombu pops a message, then records its delivery; a connection lost in between drops the message.
    audit = message_audit(store, settings)
    queue = redis_keys.model_queue("unserved")
    for job_id in ("dropped", "waiting"):
        queued_job(store, job_id)
        enqueue(audit.celery, redis_client, job_id, "unserved")
        time.sleep(0.01)
    assert "dropped" in redis_client.rpop(queue)
    # Within the slack for senders racing between noting and pushing, nothing is concluded.
    assert audit.audit_messages(stale_s=0, slack_s=5) == []
    assert audit.audit_messages(stale_s=0, slack_s=0) == ["dropped"]
    # Sent again, behind the one still waiting; the one still in its queue is left alone.
    assert [job_of(m) for m in redis_client.lrange(queue, 0, -1)] == ["dropped", "waiting"]
    # The new message carries the time it is noted as sent (Lua prints 14 digits: within a millisecond), which
    # the next audit compares with the messages behind it.
    resent = json.loads(redis_client.lindex(queue, 0))
    noted = redis_client.zscore(redis_keys.sent("unserved"), "dropped")
    assert noted is not None and abs(float(resent["headers"][SENT_HEADER]) - noted) < 0.001
    assert audit.audit_messages(stale_s=0, slack_s=0) == []


def test_a_resent_job_does_not_make_the_jobs_behind_its_first_message_look_lost(
    store: JobStore, settings: Settings, redis_client: redis.Redis
) -> None:
    # The send time is read off the oldest message itself, not off its job's latest send.
    audit = message_audit(store, settings)
    for job_id in ("first", "second"):
        queued_job(store, job_id)
        enqueue(audit.celery, redis_client, job_id, "unserved")
        time.sleep(0.01)
    time.sleep(0.05)
    enqueue(audit.celery, redis_client, "first", "unserved")  # a second message, "first"'s first one still queued
    assert audit.audit_messages(stale_s=0, slack_s=0) == []


def test_a_duplicate_message_never_takes_a_job_from_a_live_worker(store: JobStore, redis_client: redis.Redis) -> None:
    running_job(store, "busy", "alive@h", 1)
    redis_client.set(redis_keys.worker_alive("alive@h"), "1", ex=10)
    assert not store.transition("busy", JobStatus.RUNNING, worker="other@h").applied
    redis_client.delete(redis_keys.worker_alive("alive@h"))
    assert store.transition("busy", JobStatus.RUNNING, worker="other@h").applied
    assert store.get("busy").worker == "other@h" and store.get("busy").attempts == 2


def test_message_audit_ignores_recent_messages_and_jobs_that_were_taken(
    store: JobStore, settings: Settings, redis_client: redis.Redis
) -> None:
    audit = message_audit(store, settings)
    for job_id in ("recent", "taken"):
        queued_job(store, job_id)
        enqueue(audit.celery, redis_client, job_id, "unserved")
    redis_client.delete(redis_keys.model_queue("unserved"))
    assert store.transition("taken", JobStatus.RUNNING, worker="alive@h").applied
    redis_client.set(redis_keys.worker_alive("alive@h"), "1", ex=10)
    assert audit.audit_messages(stale_s=60) == []
    assert audit.audit_messages(stale_s=0, slack_s=0) == ["recent"]
    # Taking a job ends the audit's watch over it.
    assert redis_client.zrange(redis_keys.sent("unserved"), 0, -1) == ["recent"]


def test_message_audit_takes_back_a_delivery_that_was_never_claimed(
    store: JobStore, settings: Settings, redis_client: redis.Redis
) -> None:
    # A message delivered to a consumer whose connection then died (a Redis restart): Kombu would give it
    # back only after the visibility timeout, an hour by default.
    audit = message_audit(store, settings)
    queue = redis_keys.model_queue("unserved")
    for job_id in ("orphan", "fresh"):
        queued_job(store, job_id)
        enqueue(audit.celery, redis_client, job_id, "unserved")
    for tag, delivered_at in (("tag-orphan", time.time() - 120), ("tag-fresh", time.time())):
        payload = redis_client.rpop(queue)
        redis_client.hset(redis_keys.broker_unacked(), tag, json.dumps([json.loads(payload), queue, queue]))
        redis_client.zadd(redis_keys.broker_unacked_index(), {tag: delivered_at})
    assert audit.audit_messages(stale_s=60) == []  # sent just now
    seconds, _ = redis_client.time()
    redis_client.zadd(redis_keys.sent("unserved"), {"orphan": seconds - 100, "fresh": seconds - 100})
    assert audit.audit_messages(stale_s=60) == ["orphan"]
    assert redis_client.hkeys(redis_keys.broker_unacked()) == ["tag-fresh"]
    assert [job_of(m) for m in redis_client.lrange(queue, 0, -1)] == ["orphan"]


def job_of(payload: str) -> str:
    return json.loads(payload)["headers"]["argsrepr"].strip("[]'")


@pytest.mark.slow
def test_sigterm_lets_the_running_batch_finish_and_leaves_the_rest_queued(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    # Scale-in and deploys stop workers with SIGTERM: Celery's warm shutdown must not lose or repeat work.
    first = start_worker(settings, "tiny-t5-chaos", redis_client)
    try:
        jobs = [
            client.post("/v1/jobs", json={"question": f"How do I deploy? {i}", "model": "tiny-t5-chaos", "params": SLOW}).get_json()
            for i in range(40)
        ]
        deadline = time.monotonic() + 30
        while not any(client.get(f"/v1/jobs/{j['id']}").get_json()["status"] == "running" for j in jobs):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        running = {j["id"] for j in jobs if client.get(f"/v1/jobs/{j['id']}").get_json()["status"] == "running"}
        first.process.send_signal(signal.SIGTERM)
        first.process.wait(120)
        assert first.process.returncode == 0, first.log()
    finally:
        first.stop()
    after_stop = {j["id"]: client.get(f"/v1/jobs/{j['id']}").get_json() for j in jobs}
    # What was running finished under the stopping worker; nothing is left claimed by it.
    assert all(after_stop[j]["status"] == "succeeded" and after_stop[j]["attempts"] == 1 for j in running)
    assert {j["status"] for j in after_stop.values()} <= {"succeeded", "queued"}
    assert any(j["status"] == "queued" for j in after_stop.values()), "the test needs work left over"
    second = start_worker(settings, "tiny-t5-chaos", redis_client)
    try:
        done = [client.get(f"/v1/jobs/{j['id']}?wait=60").get_json() for j in jobs]
        assert [j["status"] for j in done] == ["succeeded"] * len(jobs), [j.get("error") for j in done if j["status"] != "succeeded"]
        assert max(j["attempts"] for j in done) == 1
    finally:
        second.stop()


def test_batch_items_a_worker_claimed_and_died_with_are_sent_again_by_the_reaper(
    store: JobStore, settings: Settings, redis_client: redis.Redis
) -> None:
    batch = Batch.new("unserved", 3, "24h", None, None)
    items = [[f"00000000-0000-4000-8000-00000000000{i}", "q", None, 5, {}, str(i)] for i in range(3)]
    BatchStore(store).create(batch, items)
    redis_client.set(redis_keys.worker_alive("taker@h"), "1", ex=60)
    claimed = store.claim_pending("unserved", 2, worker="taker@h", started_at=time.time())  # and the worker dies here
    assert [job.id for job in claimed] == [row[0] for row in items[:2]]
    assert redis_client.llen(redis_keys.batch_pending(batch.id)) == 1
    assert redis_client.smembers(redis_keys.worker_jobs("taker@h")) == {job.id for job in claimed}
    assert reaper(store, settings).reap_dead_workers() == [], "not while its heartbeat lives"
    redis_client.delete(redis_keys.worker_alive("taker@h"))
    assert sorted(reaper(store, settings).reap_dead_workers()) == sorted(job.id for job in claimed)
    assert redis_client.llen(redis_keys.model_batch_queue("unserved")) == 2
