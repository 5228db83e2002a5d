"""`REDIS_URL=rediss://...`: the API and a worker reach Redis over TLS only, and a job goes all the way through."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import redis

from api import create_app
from shared.config import Settings
from cli.redis_server import EmbeddedRedis
from tests.helpers import TlsProxy, self_signed_certificate, start_worker

# Starts workers of its own.
pytestmark = pytest.mark.slow


def test_a_job_goes_through_over_tls(settings: Settings, redis_server: EmbeddedRedis, redis_client: redis.Redis, tmp_path: Path) -> None:
    certificate, key = self_signed_certificate(tmp_path)
    proxy = TlsProxy(certificate, key, redis_server.port)
    url = f"rediss://:{redis_server.password}@127.0.0.1:{proxy.port}/0?ssl_cert_reqs=required&ssl_ca_certs={certificate}"
    tls = dataclasses.replace(settings, redis_url=url)
    try:
        assert answer_one_job(tls, tls, redis_client)["status"] == "succeeded"
        # Both the API and the worker (broker and job store) connected through the TLS front.
        assert proxy.handshakes >= 3
        # And a client that does not trust the certificate is refused.
        untrusting = redis.Redis.from_url(url.replace(f"&ssl_ca_certs={certificate}", ""), socket_connect_timeout=3)
        with pytest.raises(redis.ConnectionError, match="(?i)certificate"):
            untrusting.ping()
    finally:
        proxy.close()


def answer_one_job(api_settings: Settings, worker_settings: Settings, redis_client: redis.Redis) -> dict[str, Any]:
    """One job through an API built on `api_settings` and a worker started on `worker_settings`; the finished job."""
    client = create_app(api_settings).test_client()
    worker = start_worker(worker_settings, "tiny-t5-chaos", redis_client)
    try:
        assert client.get("/readyz").status_code == 200
        job = client.post("/v1/jobs", json={"question": "Who may do what?", "model": "tiny-t5-chaos", "params": {"max_new_tokens": 2}})
        assert job.status_code == 202, job.get_json()
        done: dict[str, Any] = client.get(f"/v1/jobs/{job.get_json()['id']}?wait=60").get_json()
        return done
    finally:
        worker.stop()


API_ACL = "on >api-password-0123456789 ~ragq:* ~ragq.* ~_kombu.* resetchannels &ragq:* &ragq:job:*:events +@all -@dangerous +info +ping"
WORKER_ACL = "on >worker-password-0123456789 ~* &* +@all -@dangerous +info +ping"


def test_api_and_worker_run_as_the_acl_users_the_readme_describes(
    settings: Settings, redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    # The same rules as the README's "Security" section.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"ACL SETUSER ragq-api {API_ACL.replace('api-password-0123456789', 'api-password')}" in readme
    assert f"ACL SETUSER ragq-worker {WORKER_ACL.replace('worker-password-0123456789', 'worker-password')}" in readme
    redis_client.execute_command("ACL", "SETUSER", "ragq-api", *API_ACL.split())
    redis_client.execute_command("ACL", "SETUSER", "ragq-worker", *WORKER_ACL.split())
    base = f"redis://{{user}}:{{password}}@127.0.0.1:{redis_server.port}/0"
    api_settings = dataclasses.replace(settings, redis_url=base.format(user="ragq-api", password="api-password-0123456789"))
    worker_settings = dataclasses.replace(settings, redis_url=base.format(user="ragq-worker", password="worker-password-0123456789"))
    try:
        done = answer_one_job(api_settings, worker_settings, redis_client)
        assert done["status"] == "succeeded", done
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis.Redis.from_url(api_settings.redis_url).flushall()
    finally:
        redis_client.execute_command("ACL", "DELUSER", "ragq-api", "ragq-worker")
