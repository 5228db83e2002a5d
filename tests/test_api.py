import dataclasses
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from api import create_app
from shared import redis_keys
from shared.config import Settings
from shared.jobs import JobStatus
from shared.models import ModelSpec
from shared.store import JobStore
from tests.helpers import data_keys

VALID = {"question": "How do I add more workers?"}


@pytest.fixture
def client(settings: Settings, redis_client: redis.Redis) -> FlaskClient:
    """Default model `idle-t5`: no worker consumes its queue, whatever else this test run has started."""
    idle = dataclasses.replace(settings, default_model=ModelSpec("idle-t5", settings.default_model.source))
    return create_app(idle).test_client()


def post(client: FlaskClient, body: Any) -> Any:
    return client.post("/v1/jobs", json=body)


def queue_length(client_redis: redis.Redis, model: str = "idle-t5") -> int:
    return int(client_redis.llen(redis_keys.model_queue(model)))


def test_submit_returns_202_with_job_and_location(client: FlaskClient, redis_client: redis.Redis) -> None:
    response = post(client, {**VALID, "course": "ragq", "top_k": 3, "params": {"max_new_tokens": 20}})
    assert response.status_code == 202
    job = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["model"] == "idle-t5"
    assert job["top_k"] == 3 and job["course"] == "ragq"
    assert job["params"] == {"max_new_tokens": 20}
    assert job["created_at"].endswith("Z")
    assert queue_length(redis_client) == 1
    assert client.get(response.headers["Location"]).get_json() == job


def test_job_goes_to_its_models_queue(client: FlaskClient, redis_client: redis.Redis) -> None:
    assert post(client, {**VALID, "model": "unserved"}).status_code == 202
    assert queue_length(redis_client, "unserved") == 1
    assert queue_length(redis_client, "idle-t5") == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "question"),
        ({"question": ""}, "question"),
        ({"question": "   "}, "question"),
        ({"question": "x" * 2001}, "question"),
        ({"question": 5}, "question"),
        ({**VALID, "top_k": 0}, "top_k"),
        ({**VALID, "top_k": 21}, "top_k"),
        ({**VALID, "top_k": "5"}, "top_k"),
        ({**VALID, "course": ""}, "course"),
        ({**VALID, "course": "c" * 201}, "course"),
        ({**VALID, "params": {"max_new_tokens": 0}}, "params.max_new_tokens"),
        ({**VALID, "params": {"max_new_tokens": 1025}}, "params.max_new_tokens"),
        ({**VALID, "params": {"min_new_tokens": -1}}, "params.min_new_tokens"),
        ({**VALID, "params": {"num_beams": 9}}, "params.num_beams"),
        ({**VALID, "params": {"num_beams": 0}}, "params.num_beams"),
        ({**VALID, "params": {"temperature": 0}}, "params.temperature"),
        ({**VALID, "params": {"temperature": 5.5}}, "params.temperature"),
        ({**VALID, "params": {"top_p": 0}}, "params.top_p"),
        ({**VALID, "params": {"top_p": 1.5}}, "params.top_p"),
        ({**VALID, "params": {"top_k": 0}}, "params.top_k"),
        ({**VALID, "params": {"top_k": 1001}}, "params.top_k"),
        ({**VALID, "params": {"do_sample": "yes"}}, "params.do_sample"),
        ({**VALID, "params": {"seed": 1}}, "params.seed"),
        ({**VALID, "params": []}, "params"),
        ({**VALID, "extra": 1}, "extra"),
        ({**VALID, "model": "gpt-4"}, "model"),
    ],
)
def test_invalid_fields_get_422_naming_the_field_and_store_nothing(
    client: FlaskClient, redis_client: redis.Redis, body: dict[str, Any], field: str
) -> None:
    response = post(client, body)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["type"] == "validation_error"
    assert field in [d["field"] for d in error["details"]]
    assert data_keys(redis_client) == set()


def test_unknown_model_error_lists_served_models(client: FlaskClient) -> None:
    [detail] = post(client, {**VALID, "model": "gpt-4"}).get_json()["error"]["details"]
    for name in ("idle-t5", "tiny-phi3", "unserved"):
        assert name in detail["message"]


def test_bounds_themselves_are_accepted(client: FlaskClient) -> None:
    body = {
        "question": "x" * 2000,
        "top_k": 20,
        "params": {"max_new_tokens": 1024, "num_beams": 8, "temperature": 5, "top_p": 1, "top_k": 1000, "do_sample": True},
    }
    assert post(client, body).status_code == 202


def test_question_cap_follows_configuration(settings: Settings, redis_client: redis.Redis) -> None:
    client = create_app(dataclasses.replace(settings, max_question_chars=10)).test_client()
    assert post(client, {"question": "x" * 11}).status_code == 422
    assert post(client, {"question": "x" * 10}).status_code == 202


def test_malformed_json_is_400(client: FlaskClient, redis_client: redis.Redis) -> None:
    response = client.post("/v1/jobs", data="{bad", content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"]["type"] == "bad_request"
    assert data_keys(redis_client) == set()


def test_non_json_content_type_is_400(client: FlaskClient) -> None:
    response = client.post("/v1/jobs", data="question=x", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 400


def test_json_that_is_not_an_object_is_422(client: FlaskClient) -> None:
    assert post(client, ["question"]).status_code == 422


def test_body_too_large_is_413(client: FlaskClient, redis_client: redis.Redis) -> None:
    response = client.post("/v1/jobs", data='{"question": "' + "x" * 70_000 + '"}', content_type="application/json")
    assert response.status_code == 413
    assert response.get_json()["error"]["type"] == "payload_too_large"
    assert data_keys(redis_client) == set()


@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "not-a-uuid", "../../etc"])
def test_unknown_job_returns_404(client: FlaskClient, job_id: str) -> None:
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 404


def test_unknown_route_is_json_404(client: FlaskClient) -> None:
    response = client.get("/v2/nothing")
    assert response.status_code == 404
    assert response.get_json()["error"]["type"] == "not_found"


def test_cancel_queued_job_then_409_on_second_cancel(client: FlaskClient) -> None:
    job = post(client, VALID).get_json()
    response = client.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 200
    assert response.get_json()["status"] == "cancelled"
    assert response.get_json()["finished_at"] is not None
    again = client.delete(f"/v1/jobs/{job['id']}")
    assert again.status_code == 409
    assert again.get_json()["error"]["details"] == {"status": "cancelled"}


def test_cancel_running_job_succeeds(client: FlaskClient, store: JobStore) -> None:
    job = post(client, VALID).get_json()
    store.transition(job["id"], JobStatus.RUNNING)
    assert client.delete(f"/v1/jobs/{job['id']}").get_json()["status"] == "cancelled"


@pytest.mark.parametrize("final", [JobStatus.SUCCEEDED, JobStatus.FAILED])
def test_cancel_finished_job_is_409(client: FlaskClient, store: JobStore, final: JobStatus) -> None:
    job = post(client, VALID).get_json()
    store.transition(job["id"], JobStatus.RUNNING)
    store.transition(job["id"], final)
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 409


@pytest.mark.parametrize("wait", ["-1", "61", "abc", "nan", "inf"])
def test_wait_out_of_range_is_422(client: FlaskClient, wait: str) -> None:
    job = post(client, VALID).get_json()
    assert client.get(f"/v1/jobs/{job['id']}?wait={wait}").status_code == 422


def test_long_poll_returns_early_when_the_job_finishes(client: FlaskClient, store: JobStore) -> None:
    job = post(client, VALID).get_json()
    store.transition(job["id"], JobStatus.RUNNING)
    threading.Timer(0.5, lambda: store.transition(job["id"], JobStatus.SUCCEEDED, answer="done")).start()
    started = time.monotonic()
    response = client.get(f"/v1/jobs/{job['id']}?wait=30")
    elapsed = time.monotonic() - started
    assert response.get_json()["status"] == "succeeded"
    assert response.get_json()["answer"] == "done"
    assert 0.4 < elapsed < 5


def test_long_poll_times_out_with_current_state(client: FlaskClient) -> None:
    job = post(client, VALID).get_json()
    started = time.monotonic()
    response = client.get(f"/v1/jobs/{job['id']}?wait=1")
    assert response.status_code == 200
    assert response.get_json()["status"] == "queued"
    assert 1.0 <= time.monotonic() - started < 3


def test_healthz_and_readyz(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ready"}


@pytest.fixture
def down_client(settings: Settings) -> FlaskClient:
    from cli.redis_server import free_port

    return create_app(dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()


def test_redis_down_gives_503_with_retry_after(down_client: FlaskClient) -> None:
    for response in (
        down_client.post("/v1/jobs", json=VALID),
        down_client.get(f"/v1/jobs/{uuid.uuid4()}"),
        down_client.delete(f"/v1/jobs/{uuid.uuid4()}"),
        down_client.get("/readyz"),
    ):
        assert response.status_code == 503
        assert response.get_json()["error"]["type"] == "unavailable"
        assert response.headers["Retry-After"]
    assert down_client.get("/healthz").status_code == 200


def test_validation_comes_before_redis(down_client: FlaskClient) -> None:
    assert down_client.post("/v1/jobs", json={"question": ""}).status_code == 422


def test_openapi_document_uses_the_validating_models(client: FlaskClient) -> None:
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) >= {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/batches", "/v1/batches/{batch_id}/results", "/healthz"}
    schemas = doc["components"]["schemas"]
    request = schemas["JobRequest"]
    assert request["additionalProperties"] is False
    assert request["properties"]["question"]["maxLength"] == 2000
    assert request["properties"]["top_k"]["maximum"] == 20
    params = schemas["GenerationParams"]["properties"]
    assert params["max_new_tokens"]["anyOf"][0]["maximum"] == 1024
    assert params["num_beams"]["anyOf"][0]["maximum"] == 8
    assert "JobView" in schemas and "BatchLine" in schemas and "BatchOptions" in schemas
    assert "custom_id" in schemas["BatchLine"]["required"]
    assert set(schemas["JobView"]["required"]) >= {"id", "status", "answer", "sources", "timings", "usage"}


def test_full_redis_gives_503_and_stores_nothing(client: FlaskClient, redis_client: redis.Redis) -> None:
    # Any limit below what Redis already uses makes every write fail with OOM under noeviction.
    redis_client.config_set("maxmemory", 1)
    try:
        keys_before = data_keys(redis_client)
        for _ in range(3):
            response = client.post("/v1/jobs", json={"question": "Is there room?"})
            assert response.status_code == 503
            error = response.get_json()["error"]
            assert error["type"] == "unavailable" and "(Redis)" in error["message"]
            assert response.headers["Retry-After"]
        assert data_keys(redis_client) == keys_before
    finally:
        redis_client.config_set("maxmemory", 0)
