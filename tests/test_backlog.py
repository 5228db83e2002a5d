"""Batch items straight from their batches (`worker.backlog`, `JobStore.claim_pending`, `finish_many`,
`give_back`): round-robin, claimed in the call that takes them, results stored a microbatch at a time, given back
by a draining worker; end to end, SIGTERM to a worker draining a batch loses, repeats and delays nothing."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from api import create_app
from shared import redis_keys
from shared.batch_store import BatchStore
from shared.batches import Batch
from shared.config import Settings
from shared.jobs import JobStatus
from shared.store import JobStore
from shared.usage import UsageStore
from tests.helpers import start_worker
from tests.test_batches import items, jsonl, submit
from tests.test_drain import MODEL, drain_settings

WORKER = "taker@h"


def make_batch(store: JobStore, tag: str, n: int, model: str = "unserved", tenant: str | None = None) -> Batch:
    batch = Batch.new(model, n, "24h", None, None, tenant=tenant) if tenant else Batch.new(model, n, "24h", None, None)
    rows = [[f"{tag}-{i:04d}", f"question {i}", None, 5, {}, str(i)] for i in range(n)]
    BatchStore(store).create(batch, rows)
    return batch


def claim(store: JobStore, n: int, worker: str = WORKER) -> list[str]:
    return [job.id for job in store.claim_pending("unserved", n, worker=worker, started_at=time.time())]


def test_claim_pending_takes_an_equal_share_of_each_batch_and_claims_what_it_takes(
    store: JobStore, redis_client: redis.Redis
) -> None:
    big, small = make_batch(store, "big", 10), make_batch(store, "small", 3)
    taken = claim(store, 6)
    assert Counter(job_id.split("-")[0] for job_id in taken) == {"big": 3, "small": 3}
    jobs = [store.get(job_id) for job_id in taken]
    assert {(j.status, j.worker, j.attempts) for j in jobs} == {(JobStatus.RUNNING, WORKER, 1)}
    assert redis_client.smembers(redis_keys.worker_jobs(WORKER)) == set(taken)
    assert WORKER in redis_client.smembers(redis_keys.workers_with_jobs())
    assert int(redis_client.hget(redis_keys.batch_counts(big.id), "running")) == 3
    assert int(redis_client.hget(redis_keys.batch_counts(small.id), "queued")) == 0
    # The small batch is used up: the next take is all big, and leaves the small batch out of the rotation.
    assert {job_id.split("-")[0] for job_id in claim(store, 5)} == {"big"}
    assert redis_client.lrange(redis_keys.active_batches("unserved"), 0, -1) == [big.id]


def test_claim_pending_drops_items_that_ended_while_pending(store: JobStore) -> None:
    batch = make_batch(store, "c", 3)
    store.transition("c-0001", JobStatus.CANCELLED)
    assert claim(store, 3) == ["c-0000", "c-0002"]
    assert store.get("c-0001").status is JobStatus.CANCELLED
    assert claim(store, 3) == []
    assert store.get("c-0000").batch_id == batch.id


def test_finish_many_stores_each_result_and_ends_the_batch_once(store: JobStore, redis_client: redis.Redis) -> None:
    batch = make_batch(store, "f", 3, tenant="acme")
    taken = claim(store, 3)
    usage = {"prompt_tokens": 10, "completion_tokens": 4, "generate_s": 0.25}
    outcomes = store.finish_many(
        [
            (taken[0], JobStatus.SUCCEEDED, {"answer": "a", "usage": usage}),
            (taken[1], JobStatus.SUCCEEDED, {"answer": "b", "usage": usage}),
            (taken[2], JobStatus.FAILED, {"error": {"type": "timeout", "message": "late"}}),
        ]
    )
    assert [(o.applied, o.previous) for o in outcomes] == [(True, JobStatus.RUNNING)] * 3
    assert [store.get(j).status for j in taken] == [JobStatus.SUCCEEDED, JobStatus.SUCCEEDED, JobStatus.FAILED]
    assert store.get(taken[0]).answer == "a"
    assert all(0 < redis_client.ttl(redis_keys.job(j)) <= store.result_ttl_s for j in taken)
    counts = {k: int(v) for k, v in redis_client.hgetall(redis_keys.batch_counts(batch.id)).items()}
    assert (counts["succeeded"], counts["failed"], counts["running"], counts["queued"]) == (2, 1, 0, 0)
    assert redis_client.hget(redis_keys.batch(batch.id), "status") == "completed"
    assert redis_client.smembers(redis_keys.worker_jobs(WORKER)) == set()
    assert redis_client.get(redis_keys.tenant_outstanding("acme")) is None
    # Usage: both succeeded jobs, summed, counted once.
    (total,) = UsageStore(redis_client).totals(["acme"])
    assert total.figures == {"jobs": 2, "prompt_tokens": 20, "completion_tokens": 8, "generate_s": 0.5}
    # A second store of the same results changes nothing.
    again = store.finish_many([(taken[0], JobStatus.SUCCEEDED, {"answer": "other", "usage": usage})])
    assert [(o.applied, o.previous) for o in again] == [(False, JobStatus.SUCCEEDED)]
    assert store.get(taken[0]).answer == "a"
    assert UsageStore(redis_client).totals(["acme"])[0].figures["jobs"] == 2


def test_give_back_queues_unstarted_items_first_in_line_with_their_attempt_returned(
    store: JobStore, redis_client: redis.Redis
) -> None:
    batch = make_batch(store, "g", 6)
    taken = claim(store, 4)
    store.finish_many([(taken[0], JobStatus.SUCCEEDED, {"answer": "a"})])
    # Only items still running under this worker go back (not the finished one, not another worker's).
    assert store.give_back(taken, WORKER, "unserved") == 3
    jobs = [store.get(j) for j in taken[1:]]
    assert {(j.status, j.worker, j.attempts, j.started_at) for j in jobs} == {(JobStatus.QUEUED, None, 0, None)}
    assert redis_client.smembers(redis_keys.worker_jobs(WORKER)) == set()
    counts = {k: int(v) for k, v in redis_client.hgetall(redis_keys.batch_counts(batch.id)).items()}
    assert (counts["queued"], counts["running"], counts["succeeded"]) == (5, 0, 1)
    # First in line, in their order; the next claim counts them a first attempt.
    assert claim(store, 3, worker="other@h") == taken[1:]
    assert {store.get(j).attempts for j in taken[1:]} == {1}
    assert store.give_back(taken[1:], WORKER, "unserved") == 0


@pytest.mark.slow
def test_sigterm_while_draining_a_batch_gives_back_what_was_not_started(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    settings = drain_settings(settings, tmp_path)
    client = create_app(settings).test_client()
    draining = start_worker(settings, MODEL, redis_client)
    try:
        params = {"max_new_tokens": 10, "min_new_tokens": 10}
        body = items(120, "", params=params)
        response = submit(client, jsonl(body), query=f"?model={MODEL}")
        assert response.status_code == 202, response.get_json()
        batch_id = response.get_json()["id"]
        deadline = time.monotonic() + 60
        while not client.get(f"/v1/batches/{batch_id}").get_json()["request_counts"]["succeeded"]:
            assert time.monotonic() < deadline, "the worker never finished an item"
            time.sleep(0.05)
        _, exited_after_s = draining.drain()
        # What it had not started is queued again at once, not held until a heartbeat lapses.
        counts = client.get(f"/v1/batches/{batch_id}").get_json()["request_counts"]
        assert counts["running"] == 0 and counts["queued"] > 0, counts
        held = redis_client.keys(redis_keys.worker_jobs(f"ragq-{MODEL}-{draining.process.pid}@*"))
        assert all(redis_client.scard(k) == 0 for k in held), held
        staying = start_worker(settings, MODEL, redis_client)
        try:
            deadline = time.monotonic() + 120
            while client.get(f"/v1/batches/{batch_id}").get_json()["status"] != "completed":
                assert time.monotonic() < deadline, client.get(f"/v1/batches/{batch_id}").get_json()
                time.sleep(0.2)
        finally:
            staying.stop()
    finally:
        draining.stop()
    lines = [json.loads(line) for line in client.get(f"/v1/batches/{batch_id}/results").get_data(as_text=True).splitlines()]
    assert sorted(int(line["custom_id"]) for line in lines) == list(range(120))
    assert {line["status"] for line in lines} == {"succeeded"}
    jobs = [client.get(f"/v1/jobs/{line['job_id']}").get_json() for line in lines]
    # Given back with its attempt returned: every item answered at its first attempt, once.
    assert {j["attempts"] for j in jobs} == {1}
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    results = Counter(e["job_id"] for e in ledger if e["event"] == "result")
    assert results == Counter(line["job_id"] for line in lines)
    assert exited_after_s < 8, exited_after_s
