"""`POST /v1/batches/<id>/retry`: a new batch of only the failed or expired items, linked both ways, results merged
by custom_id; end to end against a real worker."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import redis
from flask.testing import FlaskClient

from api import create_app
from shared import redis_keys
from shared.config import Settings
from tests.helpers import WorkerProcess, data_keys
from tests.test_batches import ended, wait_for_batch

TOO_LONG = " ".join(f"w{i}" for i in range(400))  # more tokens than the tiny model takes: a generation_error
FAST = {"max_new_tokens": 4}


def submit(client: FlaskClient, lines: list[dict[str, Any]], **headers: str) -> Any:
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return client.post("/v1/batches", data=body, content_type="application/x-ndjson", headers=headers)


def results(client: FlaskClient, batch_id: str, query: str = "") -> list[dict[str, Any]]:
    response = client.get(f"/v1/batches/{batch_id}/results{query}")
    assert response.status_code == 200
    return [json.loads(line) for line in response.get_data().splitlines()]


def failed_batch(client: FlaskClient) -> dict[str, Any]:
    lines = [
        {"custom_id": "first", "question": "How do I join?", "params": FAST},
        {"custom_id": "bad", "question": TOO_LONG, "params": FAST},
        {"custom_id": "last", "question": "Where are the videos?", "params": FAST},
    ]
    batch = submit(client, lines).get_json()
    done = wait_for_batch(client, batch["id"], ended)
    assert done["request_counts"]["failed"] == 1 and done["request_counts"]["succeeded"] == 2
    return done


def test_retry_holds_only_the_failed_item_linked_and_results_merge(client: FlaskClient, t5_worker: WorkerProcess) -> None:
    original = failed_batch(client)
    response = client.post(f"/v1/batches/{original['id']}/retry")
    assert response.status_code == 202, response.get_json()
    retry = response.get_json()
    assert response.headers["Location"] == f"/v1/batches/{retry['id']}"
    assert retry["retry_of"] == original["id"] and retry["request_counts"]["total"] == 1
    assert client.get(f"/v1/batches/{original['id']}").get_json()["retried_by"] == [retry["id"]]
    done = wait_for_batch(client, retry["id"], ended)
    assert [r["custom_id"] for r in results(client, retry["id"])] == ["bad"]
    assert done["request_counts"]["failed"] == 1  # the same question fails the same way
    for batch_id in (original["id"], retry["id"]):
        merged = results(client, batch_id, "?merged=true")
        assert [(r["custom_id"], r["batch_id"]) for r in merged] == [
            ("first", original["id"]), ("bad", retry["id"]), ("last", original["id"])
        ]
    assert [r["custom_id"] for r in results(client, original["id"], "?merged=true&status=failed")] == ["bad"]
    # A retry of the retry: the chain merges with the newest answer.
    second = client.post(f"/v1/batches/{retry['id']}/retry").get_json()
    wait_for_batch(client, second["id"], ended)
    merged = results(client, original["id"], "?merged=true")
    assert [r["batch_id"] for r in merged] == [original["id"], second["id"], original["id"]]


def test_retry_filters_by_error_type_and_refuses_when_nothing_is_left(
    client: FlaskClient, redis_client: redis.Redis, t5_worker: WorkerProcess
) -> None:
    original = failed_batch(client)
    before = data_keys(redis_client)
    for error_type in ("expired", "no_such_type"):
        response = client.post(f"/v1/batches/{original['id']}/retry?error_type={error_type}")
        assert response.status_code == 409 and "nothing to retry" in response.get_json()["error"]["message"]
    assert data_keys(redis_client) == before
    chosen = client.post(f"/v1/batches/{original['id']}/retry?error_type=generation_error")
    assert chosen.status_code == 202 and chosen.get_json()["request_counts"]["total"] == 1


def test_retry_is_idempotent_with_a_key(client: FlaskClient, t5_worker: WorkerProcess) -> None:
    original = failed_batch(client)
    first = client.post(f"/v1/batches/{original['id']}/retry", headers={"Idempotency-Key": "retry-1"})
    again = client.post(f"/v1/batches/{original['id']}/retry", headers={"Idempotency-Key": "retry-1"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true" and again.get_json()["id"] == first.get_json()["id"]
    assert client.get(f"/v1/batches/{original['id']}").get_json()["retried_by"] == [first.get_json()["id"]]


def test_retry_of_a_running_or_unknown_batch_is_refused(client: FlaskClient, redis_client: redis.Redis) -> None:
    # No worker serves `unserved`: the batch stays in progress.
    running = client.post(
        "/v1/batches?model=unserved", data=b'{"custom_id": "a", "question": "q"}\n', content_type="application/x-ndjson"
    ).get_json()
    before = data_keys(redis_client)
    response = client.post(f"/v1/batches/{running['id']}/retry")
    assert response.status_code == 409 and response.get_json()["error"]["details"] == {"status": "in_progress"}
    assert client.post("/v1/batches/batch_nope/retry").status_code == 404
    assert client.post(f"/v1/batches/{running['id']}/retry?bogus=1").status_code == 422
    assert client.get(f"/v1/batches/{running['id']}/results?merged=maybe").status_code == 422
    assert data_keys(redis_client) == before


def test_retry_counts_against_the_quota_of_a_new_batch(settings: Settings, redis_client: redis.Redis, t5_worker: WorkerProcess) -> None:
    client = create_app(settings).test_client()
    original = failed_batch(client)
    capped = create_app(dataclasses.replace(settings, max_open_batches=1)).test_client()
    # One open batch (on a model no worker serves) uses the cap: the retry is refused whole.
    capped.post("/v1/batches?model=unserved", data=b'{"custom_id": "a", "question": "q"}\n', content_type="application/x-ndjson")
    before = data_keys(redis_client)
    refused = capped.post(f"/v1/batches/{original['id']}/retry")
    assert refused.status_code == 429
    assert data_keys(redis_client) == before
    assert redis_client.hget(redis_keys.batch(original["id"]), "retried_by") in (None, "null")
