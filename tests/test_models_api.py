"""`GET /v1/models`: the worker registry, the bounded activity counters, and the read model over them.

The fast tests drive `worker.registry` directly against the real Redis; the slow one runs a real worker."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from api import create_app
from shared import overview, redis_keys
from shared.batches import Batch
from shared.config import Settings
from shared.jobs import Job
from tests.helpers import start_worker
from worker.registry import WorkerActivity, WorkerRegistration, describe

ACME_KEY = "acme-key-0123456789abcdef"
BETA_KEY = "beta-key-0123456789abcdef"
ACME = {"Authorization": f"Bearer {ACME_KEY}"}
BETA = {"Authorization": f"Bearer {BETA_KEY}"}
MODEL_FIELDS = {"id", "object", "created", "owned_by", "workers", "queues", "throughput", "batches", "recent_failures"}
WORKER_FIELDS = {
    "name", "host", "device", "dtype", "max_batch_size", "max_batch_tokens", "engine", "up_since", "jobs_done",
    "items_per_s", "last_error",
}


def keyed_client(settings: Settings, **changes: Any) -> FlaskClient:
    configured = dataclasses.replace(settings, api_keys=f"acme:{ACME_KEY},beta:{BETA_KEY}", **changes)
    return create_app(configured).test_client()


@pytest.fixture
def registration(redis_client: redis.Redis) -> Iterator[Callable[..., WorkerRegistration]]:
    """Registrations of made-up workers of the `unserved` model; they leave the registry after the test (tests
    keep registry entries when they empty Redis, as they do for the session's real workers)."""
    made: list[WorkerRegistration] = []

    def make(name: str = "w1@test", ttl_s: int = 15) -> WorkerRegistration:
        entry = WorkerRegistration(
            redis_client,
            WorkerActivity("unserved", name),
            describe("cpu", "float32", 16, 16384, host="box"),
            lambda: "ready",
            lambda: 0,
            ttl_s,
        )
        made.append(entry)
        return entry

    yield make
    for entry in made:
        entry.deregister()


def unserved_workers(client: redis.Redis) -> list[str]:
    return [w["name"] for w in overview.live_workers(client) if w["model"] == "unserved"]


def job(tenant: str = "acme", batch_id: str | None = None, job_id: str = "j1") -> Job:
    return Job(id=job_id, status="running", model="unserved", question="q", created_at=time.time(), tenant=tenant, batch_id=batch_id)  # type: ignore[arg-type]


def model(client: FlaskClient, name: str, headers: dict[str, str]) -> dict[str, Any]:
    response = client.get(f"/v1/models/{name}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_key_formats() -> None:
    assert redis_keys.live_workers() == "ragq:workers:live"
    assert redis_keys.worker_info("w@h") == "ragq:worker:w@h:info"
    assert redis_keys.model_finished("m", 1700000000) == "ragq:model:m:finished:1700000000"
    assert redis_keys.batch_finished("b1", 1700000010) == "ragq:batch:b1:finished:1700000010"
    assert redis_keys.tenant_failures("acme", "m") == "ragq:tenant:acme:failures:m"


def test_buckets_are_ten_seconds_and_cover_fifteen_minutes() -> None:
    assert overview.bucket_of(1700000009.9) == 1700000000
    buckets = overview.recent_buckets(1700000005.0, overview.THROUGHPUT_WINDOW_S)
    assert len(buckets) == 90 and buckets[-1] == 1700000000 and buckets[0] == 1700000000 - 890
    assert all(b - a == 10 for a, b in zip(buckets, buckets[1:]))


def test_list_has_openai_shape_and_every_served_model(settings: Settings, redis_client: redis.Redis) -> None:
    client = keyed_client(settings)
    body = client.get("/v1/models", headers=ACME).get_json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == settings.model_names
    for entry in body["data"]:
        assert set(entry) >= MODEL_FIELDS
        assert entry["object"] == "model" and entry["owned_by"] == "ragq" and isinstance(entry["created"], int)
        assert len(entry["throughput"]) == 90
    assert client.get("/v1/models").status_code == 401


def test_unknown_model_is_404_model_not_found(settings: Settings, redis_client: redis.Redis) -> None:
    response = keyed_client(settings).get("/v1/models/no-such-model", headers=ACME)
    assert response.status_code == 404
    assert response.get_json()["error"]["type"] == "model_not_found"


def test_registered_worker_is_listed_under_its_model_and_leaves_on_deregister(
    settings: Settings, redis_client: redis.Redis, registration: Callable[..., WorkerRegistration]
) -> None:
    entry = registration()
    entry.step()
    client = keyed_client(settings)
    [worker] = model(client, "unserved", BETA)["workers"]
    assert set(worker) >= WORKER_FIELDS
    assert worker["name"] == "w1@test" and worker["host"] == "box" and worker["device"] == "cpu"
    assert worker["max_batch_size"] == 16 and worker["max_batch_tokens"] == 16384 and worker["engine"] == "ready"
    assert worker["jobs_done"] == 0 and worker["last_error"] is None
    assert all(w["name"] != "w1@test" for w in model(client, "tiny-phi3", ACME)["workers"])
    entry.deregister()
    assert model(client, "unserved", BETA)["workers"] == []
    assert redis_client.zscore(redis_keys.live_workers(), "w1@test") is None
    # A round after the deregistration does not bring the entry back.
    entry.step()
    assert not redis_client.exists(redis_keys.worker_info("w1@test"))


def test_a_worker_that_stops_refreshing_disappears_within_its_ttl(
    redis_client: redis.Redis, registration: Callable[..., WorkerRegistration]
) -> None:
    registration(ttl_s=3).step()
    assert unserved_workers(redis_client) == ["w1@test"]
    assert 0 < redis_client.ttl(redis_keys.worker_info("w1@test")) <= 3
    time.sleep(3.5)
    assert unserved_workers(redis_client) == []
    # The next live worker's refresh drops the dead name once it is well past its end.
    redis_client.zadd(redis_keys.live_workers(), {"long-dead@test": time.time() - 3600})
    registration(name="w2@test").step()
    assert "long-dead@test" not in redis_client.zrange(redis_keys.live_workers(), 0, -1)
    assert unserved_workers(redis_client) == ["w2@test"]


def test_counters_feed_jobs_done_throughput_and_the_tenants_failures(
    settings: Settings, redis_client: redis.Redis, registration: Callable[..., WorkerRegistration]
) -> None:
    entry = registration()
    for i in range(3):
        entry.activity.succeeded(job(job_id=f"ok{i}"))
    entry.activity.failed(job(tenant="beta", job_id="bad1"), "generation_error", "the model said no")
    # Nothing reaches Redis before the registration's round.
    assert not redis_client.exists(redis_keys.model_finished("unserved", overview.bucket_of(time.time())))
    entry.step()
    client = keyed_client(settings)
    seen_by_acme = model(client, "unserved", ACME)
    [worker] = seen_by_acme["workers"]
    assert worker["jobs_done"] == 4 and worker["items_per_s"] > 0
    assert worker["last_error"]["type"] == "generation_error" and worker["last_error"]["message"] == "the model said no"
    assert sum(p["items"] for p in seen_by_acme["throughput"]) == 4
    assert sum(p["failed"] for p in seen_by_acme["throughput"]) == 1
    assert seen_by_acme["recent_failures"] == []
    [failure] = model(client, "unserved", BETA)["recent_failures"]
    assert failure["job_id"] == "bad1" and failure["batch_id"] is None and failure["type"] == "generation_error"
    assert failure["at"] == pytest.approx(time.time(), abs=5)
    for key in (redis_keys.model_finished("unserved", overview.bucket_of(time.time())), redis_keys.tenant_failures("beta", "unserved")):
        assert redis_client.ttl(key) > 0


def test_recent_failures_are_capped_newest_first(redis_client: redis.Redis, registration: Callable[..., WorkerRegistration]) -> None:
    entry = registration()
    for i in range(overview.MAX_RECENT_FAILURES + 5):
        entry.activity.failed(job(tenant="acme", job_id=f"f{i}"), "timeout", f"number {i}")
    entry.step()
    failures = overview.recent_failures(redis_client, "acme", "unserved")
    assert len(failures) == overview.MAX_RECENT_FAILURES
    assert failures[0]["job_id"] == f"f{overview.MAX_RECENT_FAILURES + 4}"
    assert redis_client.llen(redis_keys.tenant_failures("acme", "unserved")) == overview.MAX_RECENT_FAILURES


def submit_batch(client: FlaskClient, headers: dict[str, str], n: int) -> str:
    lines = b"".join(json.dumps({"custom_id": str(i), "question": f"q{i}"}).encode() + b"\n" for i in range(n))
    response = client.post("/v1/batches?model=unserved", data=lines, content_type="application/x-ndjson", headers=headers)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def test_batches_are_shown_to_their_tenant_only_with_queue_depths(settings: Settings, redis_client: redis.Redis) -> None:
    client = keyed_client(settings)
    acme_batch = submit_batch(client, ACME, 5)
    beta_batch = submit_batch(client, BETA, 3)
    acme_view = model(client, "unserved", ACME)
    assert [b["id"] for b in acme_view["batches"]] == [acme_batch]
    [batch] = acme_view["batches"]
    assert batch["total"] == 5 and batch["completed"] == 0 and batch["progress"] == 0.0 and batch["eta_s"] is None
    assert [b["id"] for b in model(client, "unserved", BETA)["batches"]] == [beta_batch]
    # Another model shows neither; the queues count both tenants' pending items.
    assert model(client, "tiny-phi3", ACME)["batches"] == []
    assert acme_view["queues"]["backlog_pending"] == 8
    assert acme_view["queues"]["interactive_queued"] == 0
    client.post(f"/v1/batches/{acme_batch}/cancel", headers=ACME)
    assert model(client, "unserved", ACME)["batches"] == []


def test_eta_is_what_is_left_at_the_measured_drain_rate() -> None:
    now = 1_700_000_055.0
    batch = Batch.new("m", 100, "24h", None, None)
    batch.created_at = batch.in_progress_at = now - 600
    points = [{"t": overview.bucket_of(now) - 10 * k, "items": 5} for k in range(6)]
    view = overview.batch_progress(batch, {"succeeded": 38, "failed": 2}, points, now)
    # 30 items in the buckets from now - 60 s: the window starts at its bucket's start, 65 s ago.
    assert view["items_per_s"] == pytest.approx(30 / 65, rel=1e-3)
    assert view["eta_s"] == pytest.approx(60 / (30 / 65), rel=1e-2)
    assert view["progress"] == 0.4 and view["completed"] == 38 and view["failed"] == 2
    # A batch younger than the window is measured since it started.
    batch.created_at = batch.in_progress_at = now - 15
    young = overview.batch_progress(batch, {"succeeded": 10}, [{"t": overview.bucket_of(now), "items": 10}], now)
    assert young["items_per_s"] == pytest.approx(10 / 15, rel=1e-3)


def test_openapi_documents_the_models_endpoints(settings: Settings, redis_client: redis.Redis) -> None:
    document = keyed_client(settings).get("/openapi.json").get_json()
    assert {"/v1/models", "/v1/models/{name}"} <= set(document["paths"])
    assert set(document["components"]["schemas"]["Model"]["required"]) == MODEL_FIELDS
