"""Generation params: every value accepted is one `generate` can run; the rest are a 422, for jobs and batch lines."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from tests.helpers import data_keys

VALID = {"question": "How do I add more workers?"}

# (params, accepted): each bound itself and the value just past it.
CASES: list[tuple[dict[str, Any], bool]] = [
    ({"temperature": 1e-300}, False),
    ({"temperature": 0}, False),
    ({"temperature": 0.0099}, False),
    ({"temperature": 0.01}, True),
    ({"temperature": 5}, True),
    ({"temperature": 5.0001}, False),
    ({"temperature": -1}, False),
    ({"top_p": 0}, False),
    ({"top_p": 1e-9}, True),
    ({"top_p": 1}, True),
    ({"top_p": 1.0001}, False),
    ({"top_k": 0}, False),
    ({"top_k": 1}, True),
    ({"top_k": 1000}, True),
    ({"top_k": 1001}, False),
    ({"num_beams": 0}, False),
    ({"num_beams": 1}, True),
    ({"num_beams": 8}, True),
    ({"num_beams": 9}, False),
    ({"max_new_tokens": 0}, False),
    ({"max_new_tokens": 1}, True),
    ({"max_new_tokens": 1024}, True),
    ({"max_new_tokens": 1025}, False),
    ({"min_new_tokens": -1}, False),
    ({"min_new_tokens": 0}, True),
    ({"min_new_tokens": 1024}, True),
    ({"min_new_tokens": 1025}, False),
    ({"min_new_tokens": 10, "max_new_tokens": 10}, True),
    ({"min_new_tokens": 11, "max_new_tokens": 10}, False),
    ({"repetition_penalty": 1.2}, False),
    ({"temperature": "0.5"}, False),
    ({"temperature": True}, False),
]
NON_FINITE = ["NaN", "Infinity", "-Infinity"]


def post_job(client: FlaskClient, raw: str) -> Any:
    return client.post("/v1/jobs", data=raw, content_type="application/json")


@pytest.mark.parametrize(("params", "accepted"), CASES, ids=[json.dumps(p) for p, _ in CASES])
def test_job_generation_params_are_bounded(client: FlaskClient, redis_client: redis.Redis, params: dict[str, Any], accepted: bool) -> None:
    # A model no worker serves: an accepted job stays queued, so a session-wide worker cannot write its claim
    # into Redis during a later case's check that a refused one left nothing.
    response = post_job(client, json.dumps({**VALID, "model": "unserved", "params": params}))
    if accepted:
        assert response.status_code == 202, response.get_json()
        return
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert any(d["field"].startswith("params") for d in error["details"]), error
    assert data_keys(redis_client) == set()


@pytest.mark.parametrize(("params", "accepted"), CASES, ids=[json.dumps(p) for p, _ in CASES])
def test_batch_line_generation_params_are_bounded(client: FlaskClient, redis_client: redis.Redis, params: dict[str, Any], accepted: bool) -> None:
    line = json.dumps({**VALID, "custom_id": "a", "params": params})
    response = client.post("/v1/batches", data=line, content_type="application/x-ndjson")
    if accepted:
        assert response.status_code == 202, response.get_json()
        return
    assert response.status_code == 422, response.get_json()
    [detail] = response.get_json()["error"]["details"]
    assert detail["line"] == 1 and "params" in detail["message"]
    assert data_keys(redis_client) == set()


@pytest.mark.parametrize(("params", "accepted"), CASES, ids=[json.dumps(p) for p, _ in CASES])
def test_batch_default_params_are_bounded(client: FlaskClient, redis_client: redis.Redis, params: dict[str, Any], accepted: bool) -> None:
    line = json.dumps({**VALID, "custom_id": "a"})
    response = client.post("/v1/batches?params=" + json.dumps(params), data=line, content_type="application/x-ndjson")
    assert response.status_code == (202 if accepted else 422), response.get_json()


@pytest.mark.parametrize("name", ["temperature", "top_p"])
@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_floats_are_refused(client: FlaskClient, redis_client: redis.Redis, name: str, value: str) -> None:
    raw = f'{{"question": "q", "params": {{"{name}": {value}}}}}'
    assert math.isnan(json.loads(raw)["params"][name]) or math.isinf(json.loads(raw)["params"][name])
    assert post_job(client, raw).status_code == 422
    line = f'{{"question": "q", "custom_id": "a", "params": {{"{name}": {value}}}}}'
    assert client.post("/v1/batches", data=line, content_type="application/x-ndjson").status_code == 422
    document = f'{{"requests": [{line}]}}'
    assert client.post("/v1/batches", data=document, content_type="application/json").status_code == 422
    assert data_keys(redis_client) == set()


def test_line_params_merged_over_batch_defaults_must_still_run(client: FlaskClient, redis_client: redis.Redis) -> None:
    line = json.dumps({**VALID, "custom_id": "a", "params": {"max_new_tokens": 5}})
    response = client.post('/v1/batches?params={"min_new_tokens": 50}', data=line, content_type="application/x-ndjson")
    assert response.status_code == 422
    [detail] = response.get_json()["error"]["details"]
    assert detail["line"] == 1 and "min_new_tokens (50) must not exceed max_new_tokens (5)" in detail["message"]
    assert data_keys(redis_client) == set()
