"""The API fuzzed from its own OpenAPI document (schemathesis): no server error, every response as documented.

`python -m bench.fuzz` runs the same against the API under gunicorn with 1,000+ cases.
"""

from __future__ import annotations

import dataclasses

import redis
import schemathesis

from api import create_app
from bench.fuzz import FUZZ_KEY, HEADERS, fuzz, fuzz_stateful
from shared.config import Settings


def test_fuzzed_requests_get_documented_answers_and_no_server_error(settings: Settings, redis_client: redis.Redis) -> None:
    # The "unserved" default model: no worker takes the generated jobs, so they stay as submitted.
    fuzzed = dataclasses.replace(
        settings, default_model=settings.model("unserved"), extra_models=(settings.default_model,),
        api_keys=f"fuzz:{FUZZ_KEY}", rate_limit_per_min=1_000_000,
    )
    schema = schemathesis.openapi.from_wsgi("/openapi.json", create_app(fuzzed))
    figures = fuzz(schema, 200, headers=HEADERS)
    assert figures["cases"] >= 200
    assert figures["server_errors"] == 0, figures["statuses"]
    assert figures["check_failures"] == 0, figures["failures"]
    # Both accepted and refused requests were tried on the submit routes.
    statuses = figures["statuses"]
    assert statuses.get("POST /v1/jobs -> 202") and statuses.get("POST /v1/jobs -> 422")
    assert statuses.get("POST /v1/batches -> 202") and statuses.get("POST /v1/batches -> 422")


def test_stateful_sequences_reach_what_they_created_and_get_documented_answers(settings: Settings, redis_client: redis.Redis) -> None:
    fuzzed = dataclasses.replace(
        settings, default_model=settings.model("unserved"), extra_models=(settings.default_model,),
        api_keys=f"fuzz:{FUZZ_KEY}", rate_limit_per_min=1_000_000,
    )
    schema = schemathesis.openapi.from_wsgi("/openapi.json", create_app(fuzzed))
    statuses: dict[str, int] = {}
    # Hypothesis may stop a run early (later steps depend on ids the server made up): up to three runs.
    for _ in range(3):
        figures = fuzz_stateful(schema, 40, headers=HEADERS)
        assert figures["server_errors"] == 0, figures["statuses"]
        assert figures["check_failures"] == 0, figures["failures"]
        for label, n in figures["statuses"].items():
            statuses[label] = statuses.get(label, 0) + n
        if statuses.get("GET /v1/jobs/{job_id} -> 200") or statuses.get("DELETE /v1/jobs/{job_id} -> 200"):
            break
    # Calls chained by links reach the jobs that were created (200, not the 404 of a random id).
    assert statuses.get("GET /v1/jobs/{job_id} -> 200") or statuses.get("DELETE /v1/jobs/{job_id} -> 200"), statuses
