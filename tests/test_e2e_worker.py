"""End to end: Flask API -> real Redis -> real Celery worker subprocess -> Redis -> API."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from celery import Celery
from flask.testing import FlaskClient

from shared.broker import enqueue, make_celery
from shared.config import Settings
from shared.jobs import Job, JobStatus
from shared.store import JobStore
from tests.helpers import WorkerProcess
from worker.corpus import load_documents
from worker.retrieval import Retriever

QUESTIONS = ["How do I add more workers?", "What does ragq serve start?", "How are errors reported?"]


def submit(client: FlaskClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.get_json()
    return dict(response.get_json())


def wait(client: FlaskClient, job_id: str, timeout_s: int = 60) -> dict[str, Any]:
    job = client.get(f"/v1/jobs/{job_id}?wait={timeout_s}").get_json()
    assert job["status"] not in ("queued", "running"), job
    return dict(job)


@pytest.fixture
def celery_app(settings: Settings) -> Celery:
    return make_celery(settings)


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    return Retriever(load_documents(None, tmp_path_factory.mktemp("corpus")))


def check_answered(job: dict[str, Any], retriever: Retriever, model: str, source: str) -> None:
    assert job["status"] == "succeeded", job
    assert isinstance(job["answer"], str)
    expected = retriever.search(job["question"], job["course"], job["top_k"])
    assert [s["id"] for s in job["sources"]] == [d["id"] for d in expected]
    assert job["model"] == model and job["served_by"] == source
    assert job["usage"]["prompt_tokens"] > 0 and job["usage"]["completion_tokens"] > 0
    timings = job["timings"]
    assert timings["queue_ms"] >= 0 and timings["retrieval_ms"] > 0 and timings["generation_ms"] > 0
    assert timings["total_ms"] >= timings["queue_ms"] + timings["generation_ms"]
    assert job["worker"].startswith("ragq-")
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert job["attempts"] == 1


def test_t5_worker_answers_jobs(
    client: FlaskClient, t5_worker: WorkerProcess, retriever: Retriever, settings: Settings
) -> None:
    jobs = [submit(client, question=q, course="ragq", top_k=3, params={"max_new_tokens": 8}) for q in QUESTIONS]
    for job in jobs:
        check_answered(wait(client, job["id"]), retriever, "tiny-t5", settings.default_model.source)


def test_phi3_worker_answers_jobs(
    client: FlaskClient, phi3_worker: WorkerProcess, retriever: Retriever, settings: Settings
) -> None:
    job = submit(client, question=QUESTIONS[0], model="tiny-phi3", params={"max_new_tokens": 8, "min_new_tokens": 8})
    done = wait(client, job["id"])
    check_answered(done, retriever, "tiny-phi3", settings.model("tiny-phi3").source)
    assert done["usage"]["completion_tokens"] == 8


def test_failing_job_fails_alone_and_the_worker_goes_on(client: FlaskClient, t5_worker: WorkerProcess) -> None:
    too_long = " ".join(f"w{i}" for i in range(400))
    bad = submit(client, question=too_long, params={"max_new_tokens": 4})
    good = submit(client, question=QUESTIONS[0], params={"max_new_tokens": 4})
    failed = wait(client, bad["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "generation_error"
    assert "tokens" in failed["error"]["message"]
    assert failed["answer"] is None and failed["finished_at"] is not None
    assert wait(client, good["id"])["status"] == "succeeded"


def test_worker_skips_a_job_cancelled_before_pick_up(
    client: FlaskClient, store: JobStore, celery_app: Celery, t5_worker: WorkerProcess, settings: Settings
) -> None:
    # Stored, cancelled, and only then enqueued: the worker must see the message and skip it.
    job = Job(id="00000000-0000-4000-8000-000000000001", status=JobStatus.QUEUED, question="q", model="tiny-t5")
    store.create(job)
    assert client.delete(f"/v1/jobs/{job.id}").status_code == 200
    enqueue(celery_app, store.redis, job.id, "tiny-t5")
    sentinel = submit(client, question=QUESTIONS[1], params={"max_new_tokens": 2})
    assert wait(client, sentinel["id"])["status"] == "succeeded"
    skipped = client.get(f"/v1/jobs/{job.id}").get_json()
    assert skipped["status"] == "cancelled"
    assert skipped["started_at"] is None and skipped["attempts"] == 0 and skipped["answer"] is None


def test_redelivered_message_for_a_finished_job_changes_nothing(
    client: FlaskClient, store: JobStore, celery_app: Celery, t5_worker: WorkerProcess
) -> None:
    first = wait(client, submit(client, question=QUESTIONS[0], params={"max_new_tokens": 4})["id"])
    enqueue(celery_app, store.redis, first["id"], "tiny-t5")
    sentinel = submit(client, question=QUESTIONS[1], params={"max_new_tokens": 2})
    assert wait(client, sentinel["id"])["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{first['id']}").get_json() == first


def test_worker_consumes_only_its_models_queue(
    client: FlaskClient, t5_worker: WorkerProcess, redis_client: redis.Redis
) -> None:
    other = submit(client, question=QUESTIONS[0], model="unserved")
    sentinel = submit(client, question=QUESTIONS[1], params={"max_new_tokens": 2})
    assert wait(client, sentinel["id"])["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{other['id']}").get_json()["status"] == "queued"


def unacked_job_ids(redis_client: redis.Redis) -> str:
    """Kombu keeps each delivered, unacknowledged message in the `unacked` hash until it is acknowledged."""
    return " ".join(redis_client.hvals("unacked"))


def test_message_is_acknowledged_only_after_the_result_is_stored(
    client: FlaskClient, t5_worker: WorkerProcess, redis_client: redis.Redis
) -> None:
    slow = {"max_new_tokens": 400, "min_new_tokens": 400, "num_beams": 4}
    job = submit(client, question=QUESTIONS[0], params=slow)
    deadline = time.monotonic() + 30
    while client.get(f"/v1/jobs/{job['id']}").get_json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    held = job["id"] in unacked_job_ids(redis_client)
    still_running = client.get(f"/v1/jobs/{job['id']}").get_json()["status"] == "running"
    assert still_running, "generation finished too fast for this test to observe it"
    assert held
    assert wait(client, job["id"])["status"] == "succeeded"
    deadline = time.monotonic() + 5
    while job["id"] in unacked_job_ids(redis_client):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_jobs_waiting_together_share_a_microbatch(client: FlaskClient, t5_worker: WorkerProcess) -> None:
    params = {"max_new_tokens": 4, "min_new_tokens": 4, "num_beams": 1}
    # Occupy the worker so the next jobs wait for it together.
    blocker = submit(client, question=QUESTIONS[0], params={"max_new_tokens": 300, "min_new_tokens": 300, "num_beams": 4})
    jobs = [submit(client, question=f"{q} ({i})", params=params) for i in range(4) for q in QUESTIONS]
    assert wait(client, blocker["id"])["status"] == "succeeded"
    done = [wait(client, j["id"]) for j in jobs]
    assert all(j["status"] == "succeeded" for j in done)
    sizes = [j["timings"]["microbatch_size"] for j in done]
    assert max(sizes) > 1
    assert all(j["timings"]["microbatch_wait_ms"] is not None for j in done)
