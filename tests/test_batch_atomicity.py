"""Creating a batch leaves the whole batch or nothing, whatever fails and wherever; tenants' batch storage is capped.

Against the real Redis: failures are injected at each write step (each staged chunk, the commit), and the death
of the API process mid-upload is stood for by a request held inside its commit.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from api import create_app
from shared import batch_store as batch_store_module
from shared import redis_keys
from shared.batch_store import STAGING_TTL_S, BatchLimits, BatchStore
from shared.batches import Batch
from shared.config import Settings
from shared.errors import Unavailable
from shared.jobs import JobStatus
from shared.store import JobStore
from tests.helpers import data_keys

KEY = {"Idempotency-Key": "nightly-7"}


def jsonl(n: int, prefix: str = "q") -> bytes:
    return b"\n".join(json.dumps({"custom_id": f"{prefix}{i}", "question": f"Question {i}?"}).encode() for i in range(n))


def submit(client: FlaskClient, body: bytes, **headers: str) -> Any:
    # An unserved model: no worker takes the items, so the test sees exactly what creation left.
    return client.post("/v1/batches?model=unserved", data=body, content_type="application/x-ndjson", headers=headers)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two items per staged chunk, so a 5-line batch is written in three steps."""
    monkeypatch.setattr(batch_store_module, "CHUNK", 2)


def fail_after(monkeypatch: pytest.MonkeyPatch, method: str, calls: int) -> None:
    """Make `BatchStore.<method>` raise a Redis failure on its call number `calls` (0-based) and after."""
    original = getattr(BatchStore, method)
    seen = {"n": 0}

    def failing(self: BatchStore, *args: Any, **kwargs: Any) -> Any:
        seen["n"] += 1
        if seen["n"] > calls:
            raise Unavailable("injected: Redis failed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BatchStore, method, failing)


@pytest.mark.parametrize(("method", "calls"), [("stage", 0), ("stage", 1), ("stage", 2), ("commit", 0)])
def test_a_failure_at_any_write_step_leaves_nothing_and_the_retry_succeeds(
    client: FlaskClient, redis_client: redis.Redis, small_chunks: None, monkeypatch: pytest.MonkeyPatch, method: str, calls: int
) -> None:
    fail_after(monkeypatch, method, calls)
    response = submit(client, jsonl(5), **KEY)
    assert response.status_code == 503
    # No items, no batch, no quota held, no Idempotency-Key naming a batch that does not exist.
    assert data_keys(redis_client) == set()
    monkeypatch.undo()
    monkeypatch.setattr(batch_store_module, "CHUNK", 2)
    retry = submit(client, jsonl(5), **KEY)
    assert retry.status_code == 202
    assert retry.get_json()["request_counts"]["queued"] == 5
    assert redis_client.get(redis_keys.tenant_outstanding("local")) == "5"


def test_redis_failing_inside_the_commit_script_keeps_nothing(
    client: FlaskClient, redis_client: redis.Redis, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The commit script itself raising (for example Redis out of memory at its first write).
    monkeypatch.setattr(batch_store_module, "_COMMIT_LUA", "return redis.error_reply('OOM injected')")
    response = submit(create_app_like(client), jsonl(5), **KEY)
    assert response.status_code == 503
    assert data_keys(redis_client) == set()


def create_app_like(client: FlaskClient) -> FlaskClient:
    """A fresh app on the same settings (its BatchStore registers the patched script)."""
    return client.application.test_client()


def test_an_upload_that_never_commits_leaves_only_expiring_keys_and_a_retry_gets_409(
    client: FlaskClient, redis_client: redis.Redis, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hold the first request just before its commit: what it has written is what a dead API process leaves."""
    reached, release = threading.Event(), threading.Event()
    original = BatchStore.commit

    def held(self: BatchStore, *args: Any, **kwargs: Any) -> Any:
        reached.set()
        release.wait(30)
        raise SystemExit("the API process died")  # nothing after this point of a dying process runs

    monkeypatch.setattr(BatchStore, "commit", held)
    outcome: dict[str, Any] = {}

    def first() -> None:
        try:
            outcome["response"] = submit(client.application.test_client(), jsonl(5), **KEY)
        except SystemExit:
            outcome["died"] = True

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert reached.wait(30)
        keys = data_keys(redis_client)
        assert keys, "the upload staged its items"
        for key in keys:
            ttl = redis_client.ttl(key)
            assert 0 < ttl <= STAGING_TTL_S, (key, ttl)
        assert redis_client.get(redis_keys.tenant_outstanding("local")) is None
        assert redis_client.zcard(redis_keys.tenant_batches("local")) == 0
        assert JobStore(redis_client, 60).claim_pending("unserved", 100, worker="w@h") == []
        # A retry while the first request is still working: 409 in progress, not 404.
        monkeypatch.setattr(BatchStore, "commit", original)
        retry = submit(client, jsonl(5), **KEY)
        assert retry.status_code == 409, retry.get_json()
        assert "still being processed" in retry.get_json()["error"]["message"]
    finally:
        release.set()
        thread.join(30)


def test_a_staged_item_that_expired_before_the_commit_refuses_the_batch_whole(
    store: JobStore, redis_client: redis.Redis, small_chunks: None
) -> None:
    batches = BatchStore(store)
    batch = Batch.new("unserved", 5, "24h", None, None)
    ids: list[str] = []
    for start in range(0, 5, 2):
        ids += batches.stage(batch, [[f"00000000-0000-4000-8000-00000000000{i}", "q", None, 5, {}, f"c{i}"] for i in range(start, min(start + 2, 5))])
    redis_client.delete(redis_keys.job(ids[3]))
    with pytest.raises(Unavailable):
        batches.commit(batch, BatchLimits())
    assert redis_client.exists(redis_keys.batch(batch.id)) == 0
    assert all(redis_client.ttl(redis_keys.job(i)) > 0 for i in ids if i != ids[3])
    assert redis_client.get(redis_keys.tenant_outstanding("local")) is None


# --- Caps on what a tenant keeps in Redis ---------------------------------------------------------------------


def capped(settings: Settings, **changes: Any) -> FlaskClient:
    return create_app(dataclasses.replace(settings, **changes)).test_client()


def test_cancel_and_resubmit_loop_is_refused_once_stored_items_reach_the_cap(settings: Settings, redis_client: redis.Redis) -> None:
    client = capped(settings, max_stored_batch_items=10)
    for round_ in range(2):
        batch = submit(client, jsonl(4, prefix=f"r{round_}-")).get_json()
        assert client.post(f"/v1/batches/{batch['id']}/cancel").status_code == 200
    refused = submit(client, jsonl(4, prefix="r2-"))
    assert refused.status_code == 429
    error = refused.get_json()["error"]
    assert error["type"] == "too_many_requests" and "stored batch items" in error["message"]
    assert error["details"]["max_stored_batch_items"] == 10 and refused.headers["Retry-After"]
    # A batch that fits under what is left is still taken.
    assert submit(client, jsonl(2, prefix="r3-")).status_code == 202


def test_stored_items_are_given_back_once_an_ended_batch_expires(settings: Settings, redis_client: redis.Redis) -> None:
    client = capped(settings, max_stored_batch_items=10, ended_batch_ttl_s=1)
    batch = submit(client, jsonl(8)).get_json()
    client.post(f"/v1/batches/{batch['id']}/cancel")
    assert submit(client, jsonl(8, prefix="b")).status_code == 429
    # Its short TTL passes: the tenant's index forgets it and its items count no more.
    time.sleep(2.1)
    assert redis_client.exists(redis_keys.batch(batch["id"])) == 0
    assert submit(client, jsonl(8, prefix="b")).status_code == 202
    assert batch["id"] not in redis_client.zrange(redis_keys.tenant_batches("local"), 0, -1)


def test_open_batches_per_tenant_are_capped(settings: Settings, redis_client: redis.Redis) -> None:
    client = capped(settings, max_open_batches=2)
    first = submit(client, jsonl(1, prefix="a")).get_json()
    assert submit(client, jsonl(1, prefix="b")).status_code == 202
    refused = submit(client, jsonl(1, prefix="c"))
    assert refused.status_code == 429 and "not yet ended" in refused.get_json()["error"]["message"]
    client.post(f"/v1/batches/{first['id']}/cancel")
    assert submit(client, jsonl(1, prefix="c")).status_code == 202


def test_items_of_a_cancelled_batch_get_the_short_ttl(settings: Settings, redis_client: redis.Redis) -> None:
    client = capped(settings, ended_batch_ttl_s=120)
    batch = submit(client, jsonl(5)).get_json()
    client.post(f"/v1/batches/{batch['id']}/cancel")
    job_ids = redis_client.lrange(redis_keys.batch_jobs(batch["id"]), 0, -1)
    assert len(job_ids) == 5
    for key in [redis_keys.job(j) for j in job_ids] + [redis_keys.batch(batch["id"]), redis_keys.batch_counts(batch["id"])]:
        assert 0 < redis_client.ttl(key) <= 120, key


def test_an_item_running_at_cancel_and_its_batch_get_the_short_ttl_when_it_finishes(
    settings: Settings, store: JobStore, redis_client: redis.Redis
) -> None:
    client = capped(settings, ended_batch_ttl_s=120)
    batch = submit(client, jsonl(3)).get_json()
    job_ids = redis_client.lrange(redis_keys.batch_jobs(batch["id"]), 0, -1)
    store.transition(job_ids[0], JobStatus.RUNNING)  # taken by a worker before the cancel
    client.post(f"/v1/batches/{batch['id']}/cancel")
    assert redis_client.hget(redis_keys.batch(batch["id"]), "status") == "cancelling"
    store.transition(job_ids[0], JobStatus.SUCCEEDED, answer="late")
    assert redis_client.hget(redis_keys.batch(batch["id"]), "status") == "cancelled"
    own = [redis_keys.batch(batch["id"]), redis_keys.batch_counts(batch["id"]), redis_keys.batch_jobs(batch["id"])]
    for key in [redis_keys.job(j) for j in job_ids] + own:
        assert 0 < redis_client.ttl(key) <= 120, (key, redis_client.ttl(key))


def test_items_of_a_completed_batch_keep_the_result_ttl(settings: Settings, store: JobStore, redis_client: redis.Redis) -> None:
    client = capped(settings, ended_batch_ttl_s=120)
    batch = submit(client, jsonl(2)).get_json()
    for job_id in redis_client.lrange(redis_keys.batch_jobs(batch["id"]), 0, -1):
        store.transition(job_id, JobStatus.RUNNING)
        store.transition(job_id, JobStatus.SUCCEEDED, answer="a")
        assert redis_client.ttl(redis_keys.job(job_id)) > 120
    assert redis_client.hget(redis_keys.batch(batch["id"]), "status") == "completed"
    assert redis_client.ttl(redis_keys.batch(batch["id"])) > 120


def test_items_of_an_expired_batch_get_the_short_ttl(settings: Settings, store: JobStore, redis_client: redis.Redis) -> None:
    client = capped(settings, ended_batch_ttl_s=120)
    batch = submit(client, jsonl(3)).get_json()
    assert BatchStore(store).expire_due(now=9e12) == [batch["id"]]
    for job_id in redis_client.lrange(redis_keys.batch_jobs(batch["id"]), 0, -1):
        assert 0 < redis_client.ttl(redis_keys.job(job_id)) <= 120


def test_the_tenants_batch_index_has_a_ttl(client: FlaskClient, redis_client: redis.Redis) -> None:
    submit(client, jsonl(1))
    for key in (redis_keys.tenant_batches("local"), redis_keys.tenant_stored_batches("local"), redis_keys.tenant_stored_items("local")):
        assert redis_client.ttl(key) > 0, key
