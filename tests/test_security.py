"""API keys, tenant isolation and quotas, through the real API on a real Redis."""

from __future__ import annotations

import dataclasses
import json
import stat
import time
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from api import create_app
from shared import redis_keys
from cli.main import main as ragq
from shared.config import Settings
from shared.errors import ConfigError
from shared.jobs import Job, JobStatus
from shared.api_keys import KeyRing, hash_key, read_keys_file
from shared.store import JobStore
from tests.helpers import data_keys

ACME_KEY = "acme-key-0123456789abcdef"
BETA_KEY = "beta-key-0123456789abcdef"
ACME = {"Authorization": f"Bearer {ACME_KEY}"}
BETA = {"Authorization": f"Bearer {BETA_KEY}"}
# No worker serves this model, so jobs stay queued while a test looks at them.
JOB = {"question": "How do I cancel a job?", "course": "ragq", "model": "unserved", "params": {"max_new_tokens": 2}}


def keyed_client(settings: Settings, **changes: object) -> FlaskClient:
    configured = dataclasses.replace(settings, api_keys=f"acme:{ACME_KEY},beta:{BETA_KEY}", **changes)  # type: ignore[arg-type]
    return create_app(configured).test_client()


@pytest.fixture
def keyed(settings: Settings, redis_client: redis.Redis) -> FlaskClient:
    return keyed_client(settings)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": ACME_KEY}])
def test_v1_routes_need_a_valid_bearer_key(keyed: FlaskClient, headers: dict[str, str], redis_client: redis.Redis) -> None:
    for method, path in (("post", "/v1/jobs"), ("get", "/v1/batches"), ("get", "/v1/jobs/00000000-0000-4000-8000-000000000000")):
        response = getattr(keyed, method)(path, json=JOB, headers=headers)
        assert response.status_code == 401, (method, path)
        assert response.get_json()["error"]["type"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert data_keys(redis_client) == set()


def test_health_and_openapi_need_no_key(keyed: FlaskClient) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path


def test_another_tenants_job_is_not_found(keyed: FlaskClient, store: JobStore) -> None:
    job = keyed.post("/v1/jobs", json=JOB, headers=ACME).get_json()
    assert keyed.get(f"/v1/jobs/{job['id']}", headers=ACME).status_code == 200
    for method in ("get", "delete"):
        response = getattr(keyed, method)(f"/v1/jobs/{job['id']}", headers=BETA)
        assert response.status_code == 404
        assert job["question"] not in response.get_data(as_text=True)
    # Beta's cancel attempt changed nothing.
    assert store.get(job["id"]).status is JobStatus.QUEUED
    assert store.get(job["id"]).tenant == "acme"


def test_another_tenants_batch_is_not_found_nor_listed(keyed: FlaskClient) -> None:
    body = '{"custom_id": "a", "question": "q1"}\n{"custom_id": "b", "question": "q2"}\n'
    headers = {**ACME, "Content-Type": "application/x-ndjson"}
    batch = keyed.post("/v1/batches?model=unserved", data=body, headers=headers).get_json()
    assert keyed.get("/v1/batches", headers=ACME).get_json()["data"][0]["id"] == batch["id"]
    assert keyed.get("/v1/batches", headers=BETA).get_json()["data"] == []
    for method, path in (
        ("get", f"/v1/batches/{batch['id']}"),
        ("post", f"/v1/batches/{batch['id']}/cancel"),
        ("get", f"/v1/batches/{batch['id']}/results"),
        ("get", f"/v1/batches?after={batch['id']}"),
    ):
        assert getattr(keyed, method)(path, headers=BETA).status_code == 404, path
    # The items are acme's jobs too.
    item = keyed.get(f"/v1/batches/{batch['id']}/results", headers=ACME).get_data(as_text=True).splitlines()[0]
    job_id = json.loads(item)["job_id"]
    assert keyed.get(f"/v1/jobs/{job_id}", headers=BETA).status_code == 404
    assert keyed.get(f"/v1/jobs/{job_id}", headers=ACME).status_code == 200


def test_idempotency_keys_are_per_tenant(keyed: FlaskClient) -> None:
    first = keyed.post("/v1/jobs", json=JOB, headers={**ACME, "Idempotency-Key": "k1"})
    other = keyed.post("/v1/jobs", json=JOB, headers={**BETA, "Idempotency-Key": "k1"})
    assert first.status_code == other.status_code == 202
    assert first.get_json()["id"] != other.get_json()["id"]
    again = keyed.post("/v1/jobs", json=JOB, headers={**ACME, "Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]


def test_outstanding_jobs_quota_gives_429_until_jobs_finish(settings: Settings, redis_client: redis.Redis, store: JobStore) -> None:
    client = keyed_client(settings, max_outstanding_jobs=3)
    ids = [client.post("/v1/jobs", json=JOB, headers=ACME).get_json()["id"] for _ in range(3)]
    refused = client.post("/v1/jobs", json=JOB, headers=ACME)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["type"] == "too_many_requests"
    assert int(refused.headers["Retry-After"]) > 0
    # A batch that does not fit is refused whole, and nothing of it is stored.
    before = redis_client.dbsize()
    batch = client.post("/v1/batches?model=unserved", data='{"custom_id": "1", "question": "q"}\n', headers={**ACME, "Content-Type": "application/x-ndjson"})
    assert batch.status_code == 429
    assert redis_client.dbsize() == before
    # Other tenants have their own quota.
    assert client.post("/v1/jobs", json=JOB, headers=BETA).status_code == 202
    # A finished (here: cancelled) job gives its place back.
    assert client.delete(f"/v1/jobs/{ids[0]}", headers=ACME).status_code == 200
    assert client.post("/v1/jobs", json=JOB, headers=ACME).status_code == 202
    assert int(redis_client.get(redis_keys.tenant_outstanding("acme")) or 0) == 3


def test_rate_limit_gives_429_with_retry_after(settings: Settings, redis_client: redis.Redis) -> None:
    client = keyed_client(settings, rate_limit_per_min=5)
    statuses = [client.get("/v1/batches", headers=ACME).status_code for _ in range(7)]
    assert statuses[:5] == [200] * 5 and statuses[5:] == [429, 429]
    limited = client.get("/v1/batches", headers=ACME)
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert client.get("/v1/batches", headers=BETA).status_code == 200


def create_key(path: Path, tenant: str, capsys: pytest.CaptureFixture[str]) -> str:
    """`ragq keys create TENANT --file PATH`; the key it printed."""
    assert ragq(["keys", "create", tenant, "--file", str(path)]) == 0
    return capsys.readouterr().out.strip()


def test_keys_file_holds_only_hashes_and_is_read_again_when_it_changes(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "api-keys"
    key = create_key(path, "acme", capsys)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key not in path.read_text() and read_keys_file(path) == [("acme", hash_key(key))]
    client = create_app(dataclasses.replace(settings, api_keys_file=path)).test_client()
    assert client.get("/v1/batches", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    # A key added while the API runs works without a restart.
    second = create_key(path, "beta", capsys)
    assert client.get("/v1/batches", headers={"Authorization": f"Bearer {second}"}).status_code == 200
    assert KeyRing([], path).tenant_for(second) == "beta"


def test_without_keys_the_api_refuses_to_listen_beyond_loopback(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="loopback"):
        create_app(dataclasses.replace(settings, host="0.0.0.0"))
    # With keys it may.
    create_app(dataclasses.replace(settings, host="0.0.0.0", api_keys=f"acme:{ACME_KEY}"))


def test_short_or_malformed_keys_are_refused_at_start_up() -> None:
    for raw in ("acme:short", "no-colon-here-0123456789", "bad tenant:0123456789abcdefgh"):
        with pytest.raises(ConfigError, match="RAGQ_API_KEYS"):
            Settings.from_env({"RAGQ_API_KEYS": raw})


def test_secrets_stay_out_of_the_settings_repr() -> None:
    settings = Settings.from_env(
        {"RAGQ_API_KEYS": f"acme:{ACME_KEY}", "RAGQ_CALLBACK_SECRET": "callback-secret-x", "REDIS_URL": "redis://:pw-secret@h:1/0"}
    )
    text = repr(settings)
    for secret in (ACME_KEY, "callback-secret-x", "pw-secret"):
        assert secret not in text


def test_client_commands_send_ragq_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.client import auth_headers

    monkeypatch.delenv("RAGQ_API_KEY", raising=False)
    assert auth_headers() == {}
    monkeypatch.setenv("RAGQ_API_KEY", ACME_KEY)
    assert auth_headers() == {"Authorization": f"Bearer {ACME_KEY}"}


def test_the_keyless_tenant_name_cannot_be_given_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="reserved"):
        Settings.from_env({"RAGQ_API_KEYS": f"local:{ACME_KEY}"})
    assert ragq(["keys", "create", "local", "--file", str(tmp_path / "keys")]) == 2


@pytest.mark.parametrize("breakage", ["malformed", "deleted", "not-utf-8"])
def test_a_broken_keys_file_refuses_every_request_until_fixed(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture, breakage: str,
) -> None:
    path = tmp_path / "api-keys"
    key = create_key(path, "acme", capsys)
    good = path.read_bytes()
    client = create_app(dataclasses.replace(settings, api_keys_file=path)).test_client()
    auth = {"Authorization": f"Bearer {key}"}
    if breakage == "malformed":
        path.write_text("this is not a keys file\n")
    elif breakage == "deleted":
        path.unlink()
    else:
        path.write_bytes(good + b"beta \xff\xfe\n")
    # A revocation by deleting or rewriting the file must not leave the old keys in force: fail closed.
    for _ in range(2):
        response = client.get("/v1/batches", headers=auth)
        assert response.status_code == 503
        assert response.get_json()["error"]["type"] == "unavailable"
        assert "keys file" in response.get_json()["error"]["message"]
    assert sum("API keys file" in r.getMessage() for r in caplog.records) == 1
    path.write_bytes(good)
    assert client.get("/v1/batches", headers=auth).status_code == 200
    # At start-up a missing file is an error that says what to do.
    path.unlink()
    with pytest.raises(ConfigError, match="ragq keys create"):
        create_app(dataclasses.replace(settings, api_keys_file=path))


def test_serve_without_keys_refuses_a_public_address(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("RAGQ_API_KEYS", "RAGQ_API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert ragq(["serve", "--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_an_unexpected_worker_error_reaches_the_client_as_a_stable_message(store: JobStore, settings: Settings) -> None:
    from concurrent.futures import Future
    from types import SimpleNamespace

    from worker.ledger import Ledger
    from worker.registry import WorkerActivity
    from worker.tasks import INTERNAL_ERROR_MESSAGE, await_final, store_final

    store.create(Job(id="boom", status=JobStatus.QUEUED, question="q", model="tiny-t5", created_at=time.time()))
    store.transition("boom", JobStatus.RUNNING, worker="w@h")
    activity = WorkerActivity("tiny-t5", "w@h")
    resident = SimpleNamespace(
        store=store, settings=settings, served_by="tiny-t5", ledger=Ledger(None), worker_name="w@h", duties=SimpleNamespace(activity=activity)
    )
    future: Future[object] = Future()
    future.set_exception(RuntimeError("CUDA error: device-side assert triggered at /opt/secret/path 0x7f3a"))
    job = store.get("boom")
    final = await_final(resident, job, time.time(), future)  # type: ignore[arg-type]
    assert final is not None
    store_final(resident, job, final)  # type: ignore[arg-type]
    error = store.get("boom").error
    assert error == {"type": "internal_error", "message": INTERNAL_ERROR_MESSAGE}
    assert "CUDA" not in str(error) and "/opt/secret" not in str(error)
    # Nor does the operator's view (`/v1/models`: the worker's last error).
    assert activity.last_error is not None and activity.last_error["message"] == INTERNAL_ERROR_MESSAGE
