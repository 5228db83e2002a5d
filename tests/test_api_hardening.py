"""The API against hostile callers: keyless exposure, DNS rebinding, JSON bombs, BOMs, and many waiting clients."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from api import create_app
from shared.config import Settings
from shared.jobs import JobStatus
from shared.store import JobStore

JOB = {"question": "How do I cancel a job?", "course": "ragq", "model": "unserved", "params": {"max_new_tokens": 2}}
KEY = "acme-key-0123456789abcdef"


def remote(client: FlaskClient, addr: str) -> FlaskClient:
    client.environ_base["REMOTE_ADDR"] = addr
    return client


@pytest.mark.parametrize("peer", ["10.1.2.3", "192.168.1.20", "203.0.113.9", "::ffff:10.1.2.3"])
def test_keyless_api_refuses_a_peer_beyond_loopback_with_403(client: FlaskClient, redis_client: redis.Redis, peer: str) -> None:
    # As under `gunicorn -b 0.0.0.0:8000 'api:create_app()'`: the bind was never checked.
    remote(client, peer)
    for method, path in (("post", "/v1/jobs"), ("get", "/v1/batches")):
        response = getattr(client, method)(path, json=JOB)
        assert response.status_code == 403, (method, path)
        assert response.get_json()["error"]["type"] == "forbidden"
    assert redis_client.dbsize() == 0
    assert client.get("/healthz").status_code == 200


def test_keyless_api_serves_loopback_peers(client: FlaskClient) -> None:
    for peer in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "127.8.9.10"):
        assert remote(client, peer).post("/v1/jobs", json=JOB).status_code == 202


def test_keyless_api_serves_a_unix_socket_peer(client: FlaskClient) -> None:
    # gunicorn -b unix:PATH gives no peer address: only processes on this machine can connect.
    assert remote(client, "").post("/v1/jobs", json=JOB).status_code == 202


def test_keyless_api_believes_no_forwarding_header(client: FlaskClient) -> None:
    # A reverse proxy on this host relays the world from 127.0.0.1; its headers are not proof of anything.
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        response = client.post("/v1/jobs", json=JOB, headers={header: "127.0.0.1"})
        assert response.status_code == 403, header


def test_trusted_network_serves_every_peer_without_keys(settings: Settings, redis_client: redis.Redis) -> None:
    client = create_app(dataclasses.replace(settings, trust_network=True, host="0.0.0.0")).test_client()
    assert remote(client, "10.1.2.3").post("/v1/jobs", json=JOB).status_code == 202


def test_keyed_api_serves_any_peer_and_host_with_a_key(settings: Settings, redis_client: redis.Redis) -> None:
    client = create_app(dataclasses.replace(settings, api_keys=f"acme:{KEY}")).test_client()
    response = remote(client, "10.1.2.3").post(
        "/v1/jobs", json=JOB, headers={"Authorization": f"Bearer {KEY}", "Host": "api.example.com"}
    )
    assert response.status_code == 202


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:8000", "127.0.0.1.nip.io", "localhost.evil.com"])
def test_keyless_api_refuses_unexpected_host_against_dns_rebinding(client: FlaskClient, host: str) -> None:
    response = client.post("/v1/jobs", json=JOB, headers={"Host": host})
    assert response.status_code == 403
    assert response.get_json()["error"]["type"] == "forbidden"


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "[::1]", "LOCALHOST"])
def test_keyless_api_accepts_loopback_hosts(client: FlaskClient, host: str) -> None:
    assert client.post("/v1/jobs", json=JOB, headers={"Host": host}).status_code == 202


def test_allowed_hosts_setting_adds_names(settings: Settings, redis_client: redis.Redis) -> None:
    client = create_app(dataclasses.replace(settings, allowed_hosts="ragq.internal, box")).test_client()
    assert client.post("/v1/jobs", json=JOB, headers={"Host": "ragq.internal:8000"}).status_code == 202
    assert client.post("/v1/jobs", json=JOB, headers={"Host": "other"}).status_code == 403


BOMBS = {"long integer": "1" * 5000, "deep nesting": "[" * 30_000}


@pytest.mark.parametrize("bomb", BOMBS.values(), ids=BOMBS.keys())
def test_json_bombs_in_a_job_body_are_400(client: FlaskClient, bomb: str) -> None:
    body = '{"question": "q", "course": "ragq", "params": {"max_new_tokens": ' + bomb + "}}"
    response = client.post("/v1/jobs", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"]["type"] == "bad_request"


@pytest.mark.parametrize("bomb", BOMBS.values(), ids=BOMBS.keys())
def test_json_bombs_in_a_json_batch_are_400(settings: Settings, redis_client: redis.Redis, bomb: str) -> None:
    client = create_app(dataclasses.replace(settings, max_body_bytes=1 << 20)).test_client()
    body = '{"requests": [], "metadata": {"x": ' + bomb + "}}"
    response = client.post("/v1/batches", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"]["type"] == "bad_request"


@pytest.mark.parametrize("bomb", ["1" * 5000, "[" * 3000], ids=["long integer", "deep nesting"])
@pytest.mark.parametrize("option", ["metadata", "params"])
def test_json_bombs_in_batch_query_options_are_400(client: FlaskClient, option: str, bomb: str) -> None:
    line = b'{"custom_id": "a", "question": "q", "course": "ragq"}\n'
    response = client.post(f"/v1/batches?model=unserved&{option}={bomb}", data=line, content_type="application/x-ndjson")
    assert response.status_code == 400
    assert response.get_json()["error"]["type"] == "bad_request"


def test_jsonl_batch_starting_with_a_utf8_bom_is_accepted(client: FlaskClient) -> None:
    body = b"\xef\xbb\xbf" + b'{"custom_id": "a", "question": "q", "course": "ragq"}\n'
    response = client.post("/v1/batches?model=unserved", data=body, content_type="application/x-ndjson")
    assert response.status_code == 202, response.get_json()


def test_waits_are_capped_per_tenant_with_429(settings: Settings, redis_client: redis.Redis, store: JobStore) -> None:
    app = create_app(dataclasses.replace(settings, max_waits_per_tenant=2))
    job_id = app.test_client().post("/v1/jobs", json=JOB).get_json()["id"]
    answers: list[int] = []

    def wait() -> None:
        answers.append(app.test_client().get(f"/v1/jobs/{job_id}?wait=5").status_code)

    waiters = [threading.Thread(target=wait) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    events = app.extensions["ragq"].events
    deadline = time.monotonic() + 5
    while events.waiting() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    response = app.test_client().get(f"/v1/jobs/{job_id}?wait=5")
    assert response.status_code == 429
    assert response.get_json()["error"]["details"] == {"max_waits_per_tenant": 2}
    assert "Retry-After" in response.headers
    # A plain read is not a wait.
    assert app.test_client().get(f"/v1/jobs/{job_id}").status_code == 200
    started = time.monotonic()
    store.transition(job_id, JobStatus.CANCELLED, finished_at=time.time())
    for waiter in waiters:
        waiter.join(5)
    assert answers == [200, 200] and time.monotonic() - started < 2
    assert events.waiting() == 0


def test_many_waits_share_one_redis_subscription(app: Flask, client: FlaskClient, store: JobStore, redis_client: redis.Redis) -> None:
    job_ids = [client.post("/v1/jobs", json=JOB).get_json()["id"] for _ in range(20)]
    results: dict[str, str] = {}

    def wait(job_id: str) -> None:
        results[job_id] = app.test_client().get(f"/v1/jobs/{job_id}?wait=10").get_json()["status"]

    waiters = [threading.Thread(target=wait, args=(job_id,)) for job_id in job_ids]
    for waiter in waiters:
        waiter.start()
    events = app.extensions["ragq"].events
    deadline = time.monotonic() + 5
    while events.waiting() < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert redis_client.pubsub_numpat() == 1 and redis_client.pubsub_channels() == []
    for job_id in job_ids:
        store.transition(job_id, JobStatus.CANCELLED, finished_at=time.time())
    for waiter in waiters:
        waiter.join(5)
    assert set(results.values()) == {"cancelled"} and len(results) == 20


@pytest.mark.slow
def test_waiting_and_half_open_connections_do_not_stop_the_api(settings: Settings, redis_client: redis.Redis) -> None:
    """More long-polls and half-open sockets than RAGQ_API_THREADS: /healthz and a submit still answer at once."""
    import socket
    import subprocess
    import sys

    import requests

    from cli.redis_server import free_port
    from tests.helpers import child_env, wait_for_api

    port = free_port()
    env = child_env(settings, RAGQ_PORT=str(port), RAGQ_API_THREADS="4", RAGQ_HEADER_TIMEOUT_S="2")
    api = subprocess.Popen([sys.executable, "-m", "api"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    held: list[socket.socket] = []
    try:
        wait_for_api(url, api, 30)
        job_id = requests.post(f"{url}/v1/jobs", json=JOB, timeout=5).json()["id"]
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(f"GET /v1/jobs/{job_id}?wait=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            held.append(sock)
        half_open = []
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            half_open.append(sock)
        held.extend(half_open)
        time.sleep(0.5)
        for _ in range(3):
            started = time.monotonic()
            assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
            assert requests.post(f"{url}/v1/jobs", json=JOB, timeout=5).status_code == 202
            assert time.monotonic() - started < 1
        # The half-open ones are cut after RAGQ_HEADER_TIMEOUT_S.
        half_open[0].settimeout(10)
        started = time.monotonic()
        assert half_open[0].recv(100) == b"" and time.monotonic() - started < 5
    finally:
        for sock in held:
            sock.close()
        api.terminate()
        api.wait(20)


def test_the_api_runs_gunicorns_gevent_worker_with_a_header_timeout(settings: Settings) -> None:
    from api.server import gunicorn_options

    options = gunicorn_options(dataclasses.replace(settings, header_timeout_s=7, api_max_connections=5000), processes=2)
    assert options["worker_class"] == "gevent" and options["keepalive"] == 7 and options["worker_connections"] == 5000
