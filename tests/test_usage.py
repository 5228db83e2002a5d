"""Usage per tenant and model: recorded with each result, bounded in Redis, read at `GET /v1/usage`."""

from __future__ import annotations

import dataclasses
import time

import pytest
import redis
from flask.testing import FlaskClient

from api import create_app
from shared import redis_keys
from shared.config import Settings
from shared.jobs import Job, JobStatus
from shared.store import JobStore
from shared.usage import RETENTION_S, UsageStore, bucket_starts, job_usage
from tests.helpers import WorkerProcess

ACME_KEY = "acme-key-0123456789abcdef"
BETA_KEY = "beta-key-0123456789abcdef"
OPS_KEY = "ops-key-0123456789abcdefgh"


def keyed_client(settings: Settings) -> FlaskClient:
    configured = dataclasses.replace(
        settings, api_keys=f"acme:{ACME_KEY},beta:{BETA_KEY},ops:{OPS_KEY}", admin_tenants="ops"
    )
    return create_app(configured).test_client()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def finished_job(store: JobStore, tenant: str, prompt: int, completion: int, model: str = "tiny-t5") -> str:
    """A job taken through queued -> running -> succeeded as a worker does, with its usage."""
    job = Job(id=f"job-{time.time_ns()}", status=JobStatus.QUEUED, question="q", model=model, tenant=tenant, created_at=time.time())
    store.redis.incr(redis_keys.tenant_outstanding(tenant))
    store.create(job)
    store.claim(job.id, worker="w@h", started_at=time.time())
    outcome = store.transition(job.id, JobStatus.SUCCEEDED, usage=job_usage(prompt, completion, 400.0, 4), answer="a")
    assert outcome.applied
    return job.id


def test_a_succeeded_job_is_counted_once_in_its_hour_day_and_total(store: JobStore) -> None:
    job_id = finished_job(store, "acme", 100, 7)
    # A duplicate final transition (a redelivered message) is refused, and counts nothing.
    assert not store.transition(job_id, JobStatus.SUCCEEDED, usage=job_usage(100, 7, 400.0, 4)).applied
    usage = UsageStore(store.redis)
    [total] = usage.totals()
    assert (total.tenant, total.model) == ("acme", "tiny-t5")
    assert total.figures == {"jobs": 1, "prompt_tokens": 100, "completion_tokens": 7, "generate_s": pytest.approx(0.1)}
    for granularity in ("hour", "day"):
        [row] = usage.buckets(granularity, time.time() - 10, time.time() + 1, ["acme"])
        assert row.figures["jobs"] == 1 and row.figures["prompt_tokens"] == 100
        key = redis_keys.usage_bucket("acme", granularity, row.start)  # type: ignore[arg-type]
        # Bounded: each bucket expires after its retention; the totals are one hash per tenant.
        assert 0 < store.redis.ttl(key) <= RETENTION_S[granularity]
    assert store.redis.ttl(redis_keys.usage_total("acme")) == -1


def test_failed_and_cancelled_jobs_count_no_usage(store: JobStore) -> None:
    job = Job(id="j-failed", status=JobStatus.QUEUED, question="q", model="tiny-t5", tenant="acme", created_at=time.time())
    store.create(job)
    store.claim(job.id, worker="w@h")
    store.transition(job.id, JobStatus.FAILED, error={"type": "x", "message": "y"})
    other = dataclasses.replace(job, id="j-cancelled")
    store.create(other)
    store.transition(other.id, JobStatus.CANCELLED)
    assert UsageStore(store.redis).totals() == []


def test_bucket_starts_cover_the_range_in_whole_hours() -> None:
    assert bucket_starts("hour", 3600 * 10 + 5, 3600 * 12) == [36000, 39600]
    assert bucket_starts("day", 86400 * 2 + 1, 86400 * 2 + 2) == [172800]
    assert bucket_starts("hour", 100, 50) == []


def test_a_tenant_sees_its_own_usage_and_an_admin_sees_every_tenants(settings: Settings, store: JobStore) -> None:
    finished_job(store, "acme", 10, 2)
    finished_job(store, "acme", 20, 3)
    finished_job(store, "beta", 5, 1)
    client = keyed_client(settings)
    acme = client.get("/v1/usage?granularity=hour", headers=auth(ACME_KEY))
    assert acme.status_code == 200, acme.json
    assert acme.json["scope"] == "tenant"
    assert {(r["tenant"], r["jobs"], r["prompt_tokens"], r["completion_tokens"]) for r in acme.json["totals"]} == {("acme", 2, 30, 5)}
    beta = client.get("/v1/usage", headers=auth(BETA_KEY)).json
    assert [(r["tenant"], r["jobs"]) for r in beta["data"]] == [("beta", 1)]
    admin = client.get("/v1/usage?granularity=day", headers=auth(OPS_KEY)).json
    assert admin["scope"] == "all"
    assert {(r["tenant"], r["jobs"], r["prompt_tokens"]) for r in admin["totals"]} == {("acme", 2, 30), ("beta", 1, 5)}
    assert client.get("/v1/usage").status_code == 401


def test_without_keys_the_local_tenant_sees_its_usage(client: FlaskClient, store: JobStore) -> None:
    finished_job(store, "local", 4, 2)
    body = client.get("/v1/usage?granularity=hour").json
    assert [(r["tenant"], r["jobs"], r["prompt_tokens"]) for r in body["data"]] == [("local", 1, 4)]


def test_a_range_selects_buckets_by_time(client: FlaskClient, store: JobStore) -> None:
    finished_job(store, "local", 4, 2)
    long_ago = client.get("/v1/usage?granularity=day&start=2020-01-01&end=2020-01-03").json
    assert long_ago["data"] == [] and long_ago["totals"] == []
    assert long_ago["start"] == "2020-01-01T00:00:00.000Z"
    now = time.time()
    recent = client.get(f"/v1/usage?granularity=hour&start={now - 7200:.0f}&end={now + 60:.0f}").json
    assert [r["jobs"] for r in recent["data"]] == [1]


@pytest.mark.parametrize(
    "query",
    [
        "granularity=minute",
        "start=yesterday",
        "end=nan",
        "start=1e300",
        "start=2026-01-02&end=2026-01-01",
        "granularity=hour&start=2026-01-01&end=2026-02-01",
        "granularity=day&start=2020-01-01&end=2026-01-01",
    ],
)
def test_bad_usage_parameters_are_400(client: FlaskClient, redis_client: redis.Redis, query: str) -> None:
    response = client.get(f"/v1/usage?{query}")
    assert response.status_code == 400, response.json
    assert response.json["error"]["type"] == "bad_request"
    assert response.json["error"]["details"][0]["field"] in {"granularity", "start", "end"}


def test_usage_refuses_unknown_query_parameters(client: FlaskClient, redis_client: redis.Redis) -> None:
    assert client.get("/v1/usage?tenant=beta").status_code == 422


def test_usage_end_to_end_with_a_real_worker(settings: Settings, t5_worker: WorkerProcess, store: JobStore) -> None:
    client = keyed_client(settings)
    submitted: dict[str, list[str]] = {"acme": [], "beta": []}
    for tenant, key, count in (("acme", ACME_KEY, 3), ("beta", BETA_KEY, 2)):
        for i in range(count):
            response = client.post(
                "/v1/jobs", json={"question": f"How do I join the course? {tenant} {i}", "params": {"max_new_tokens": 8}},
                headers=auth(key),
            )
            assert response.status_code == 202, response.json
            submitted[tenant].append(response.json["id"])
    recorded: dict[str, tuple[int, int, int]] = {}
    for tenant, key in (("acme", ACME_KEY), ("beta", BETA_KEY)):
        jobs = [client.get(f"/v1/jobs/{job_id}?wait=60", headers=auth(key)).json for job_id in submitted[tenant]]
        assert [job["status"] for job in jobs] == ["succeeded"] * len(jobs), [job["error"] for job in jobs]
        recorded[tenant] = (
            len(jobs),
            sum(job["usage"]["prompt_tokens"] for job in jobs),
            sum(job["usage"]["completion_tokens"] for job in jobs),
        )
        assert recorded[tenant][1] > 0 and recorded[tenant][2] > 0
    for tenant, key in (("acme", ACME_KEY), ("beta", BETA_KEY)):
        totals = client.get("/v1/usage?granularity=hour", headers=auth(key)).json["totals"]
        assert [(r["tenant"], r["model"]) for r in totals] == [(tenant, "tiny-t5")]
        assert (totals[0]["jobs"], totals[0]["prompt_tokens"], totals[0]["completion_tokens"]) == recorded[tenant]
        assert totals[0]["generate_seconds"] > 0
    admin = client.get("/v1/usage?granularity=day", headers=auth(OPS_KEY)).json["totals"]
    assert {r["tenant"]: (r["jobs"], r["prompt_tokens"], r["completion_tokens"]) for r in admin} == recorded
