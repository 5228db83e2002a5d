"""`GET /v1/models`: the worker registry, the bounded activity counters, and the read model over them.

The fast tests drive `worker.registry` directly against the real Redis; the slow one runs a real worker."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
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
from shared.models import ModelSpec
from tests.helpers import start_worker
from worker.registry import WorkerActivity, WorkerRegistration, describe, registration_for

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


class FakeEngineLane:
    """What the registry reads of an `EngineLane`."""

    state = "restarting"
    restarts = 2


def test_a_loading_worker_is_listed_as_starting_then_with_its_engines_state(redis_client: redis.Redis) -> None:
    entry = registration_for(redis_client, "unserved", "loading@test", 3, describe("cpu", "float32", 4, 512, host="box"))
    try:
        with entry.while_loading():
            time.sleep(1.5)  # longer than a refresh interval (1 s with a 3 s TTL)
            [worker] = [w for w in overview.live_workers(redis_client) if w["name"] == "loading@test"]
            assert worker["engine"] == "starting" and worker["jobs_done"] == 0
        entry.attach(FakeEngineLane(), describe("cuda:0", "bfloat16", 4, 512, host="box"))
        entry.step()
        [worker] = [w for w in overview.live_workers(redis_client) if w["name"] == "loading@test"]
        assert worker["engine"] == "restarting" and worker["engine_restarts"] == 2 and worker["device"] == "cuda:0"
        entry.attach(object(), describe("cpu", "float32", 4, 512))
        entry.step()
        assert [w["engine"] for w in overview.live_workers(redis_client) if w["name"] == "loading@test"] == ["thread"]
    finally:
        entry.deregister()


def test_a_worker_whose_model_fails_to_load_leaves_at_once(redis_client: redis.Redis) -> None:
    entry = registration_for(redis_client, "unserved", "failing@test", 15)
    with pytest.raises(RuntimeError), entry.while_loading():
        wait_until(lambda: "failing@test" in unserved_workers(redis_client), timeout_s=5, every_s=0.05)
        raise RuntimeError("model could not be loaded")
    assert "failing@test" not in unserved_workers(redis_client)
    assert not redis_client.exists(redis_keys.worker_info("failing@test"))


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


# --- with a real worker ----------------------------------------------------------------------------------------

CHAOS_MODEL = "tiny-t5-chaos"  # served only by workers a test starts and stops itself
# A simulated model whose device time is a sleep (worker/simulated.py): 8 new tokens take ~0.2 s a microbatch
# however fast the machine, so a batch of 30 microbatches drains slowly enough to watch its progress and ETA.
SIM_MODEL = ModelSpec("sim-xl-watched", "sim:flan-t5-xl-h200")
TOO_LONG = " ".join(f"w{i}" for i in range(400))  # more prompt tokens than the tiny model takes: generation_error


def wait_until(check: Callable[[], Any], timeout_s: float = 60, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"not within {timeout_s} s")


def chaos_workers(client: FlaskClient) -> list[dict[str, Any]]:
    return model(client, CHAOS_MODEL, ACME)["workers"]


@pytest.mark.slow
def test_a_running_worker_shows_its_work_batches_progress_for_their_tenant_and_leaves_when_stopped(
    settings: Settings, redis_client: redis.Redis
) -> None:
    # Small microbatches of a model with a fixed device time: the batch drains in steps that can be watched.
    with_sim = dataclasses.replace(settings, extra_models=(*settings.extra_models, SIM_MODEL))
    worker_settings = dataclasses.replace(with_sim, worker_ttl_s=30, max_microbatch_size=4)
    client = keyed_client(with_sim)
    worker = start_worker(worker_settings, SIM_MODEL.name, redis_client)
    try:
        [entry] = wait_until(lambda: model(client, SIM_MODEL.name, ACME)["workers"])
        assert set(entry) >= WORKER_FIELDS
        assert entry["engine"] == "ready" and entry["device"] == "cpu" and entry["dtype"] == "float32"
        assert entry["max_batch_size"] == 4 and entry["max_batch_tokens"] == 16384
        assert entry["up_since"] == pytest.approx(time.time(), abs=120) and entry["jobs_done"] == 0
        assert "@" in entry["name"] and entry["host"]

        lines = [{"custom_id": "bad", "question": TOO_LONG}]
        lines += [{"custom_id": str(i), "question": f"How do I add worker number {i}?"} for i in range(119)]
        body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        query = f"model={SIM_MODEL.name}&params=" + json.dumps({"max_new_tokens": 8, "min_new_tokens": 8, "num_beams": 1})
        response = client.post(f"/v1/batches?{query}", data=body, content_type="application/x-ndjson", headers=ACME)
        assert response.status_code == 202, response.get_json()
        batch_id = response.get_json()["id"]

        acme_views, beta_views = [], []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            acme_views.append(model(client, SIM_MODEL.name, ACME))
            beta_views.append(model(client, SIM_MODEL.name, BETA))
            if not acme_views[-1]["batches"] and acme_views[-1]["queues"]["backlog_pending"] == 0:
                break
            time.sleep(0.2)
        moving = [b for view in acme_views for b in view["batches"] if 0 < b["progress"] < 1 and b["eta_s"] is not None]
        assert moving, "the batch never showed progress with an ETA"
        assert all(b["id"] == batch_id and b["items_per_s"] > 0 and b["total"] == 120 for b in moving)
        assert all(view["batches"] == [] for view in beta_views)
        assert any(view["queues"]["backlog_pending"] > 0 for view in acme_views)

        def all_counted() -> dict[str, Any] | None:
            view = model(client, SIM_MODEL.name, ACME)
            done = sum(point["items"] for point in view["throughput"])
            return view if done == 120 and view["workers"] and view["workers"][0]["jobs_done"] == 120 else None

        final = wait_until(all_counted, timeout_s=30)
        [entry] = final["workers"]
        assert entry["items_per_s"] > 0
        assert entry["last_error"]["type"] == "generation_error"
        assert sum(point["failed"] for point in final["throughput"]) == 1
        [failure] = final["recent_failures"]
        assert failure["batch_id"] == batch_id and failure["type"] == "generation_error"
        assert model(client, SIM_MODEL.name, BETA)["recent_failures"] == []
    finally:
        worker.stop()
    # A clean shutdown leaves the registry at once, long before the 30 s TTL.
    assert wait_until(lambda: model(client, SIM_MODEL.name, ACME)["workers"] == [], timeout_s=5)


@pytest.mark.slow
def test_a_worker_that_dies_disappears_within_its_ttl(settings: Settings, redis_client: redis.Redis) -> None:
    client = keyed_client(settings)
    worker = start_worker(dataclasses.replace(settings, worker_ttl_s=3), CHAOS_MODEL, redis_client)
    try:
        wait_until(lambda: chaos_workers(client))
        os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait(timeout=10)
        started = time.monotonic()
        wait_until(lambda: chaos_workers(client) == [], timeout_s=10)
        assert time.monotonic() - started <= 5
    finally:
        worker.stop()
