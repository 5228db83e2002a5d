"""Batch callbacks: signed, retried, and only to public addresses unless allowed."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from api import create_app
from shared import redis_keys
from shared.batch_store import BatchStore
from shared.batches import Batch
from shared.callback_signing import sign, tenant_secret, verify
from shared.config import Settings
from shared.store import JobStore
from tests.helpers import Receiver, WorkerProcess, data_keys
from tests.test_batches import FAST, ended, items, jsonl, submit, wait_for_batch
from worker.callbacks import CallbackSender


def verify_like_the_readme(secret: str, body: bytes, header: str) -> bool:
    """The README's verification example, verbatim in substance."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    t = int(fields["t"])
    if abs(time.time() - t) > 300:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(failures=1)
    yield r
    r.server.shutdown()


def test_callback_is_signed_retried_and_verifiable(
    client: FlaskClient, t5_worker: WorkerProcess, receiver: Receiver, settings: Settings
) -> None:
    batch = submit(client, jsonl(items(2, params=FAST)), query=f"?callback_url={receiver.url}").get_json()
    wait_for_batch(client, batch["id"], ended)
    deadline = time.monotonic() + 20
    while len(receiver.requests) < 2:
        assert time.monotonic() < deadline, receiver.requests
        time.sleep(0.1)
    time.sleep(0.5)
    assert len(receiver.requests) == 2  # one failure, one success, then no more
    headers, body = receiver.requests[-1]
    # What a receiver does (the README's example): its tenant's secret from the API, then the signature.
    secret = client.get("/v1/callbacks/secret").get_json()["secret"]
    assert verify_like_the_readme(secret, body, headers["Ragq-Signature"])
    assert "X-Ragq-Signature" not in headers
    final = json.loads(body)
    assert final["id"] == batch["id"] and final["status"] == "completed"
    assert final["request_counts"]["succeeded"] == 2


def test_callback_needs_a_configured_secret(settings: Settings, redis_client: redis.Redis) -> None:
    no_secret = create_app(dataclasses.replace(settings, callback_secret=None)).test_client()
    response = submit(no_secret, jsonl(items(1)), query="?callback_url=http://127.0.0.1:9/x")
    assert response.status_code == 422
    assert "RAGQ_CALLBACK_SECRET" in response.get_json()["error"]["message"]


def test_callbacks_to_non_public_addresses_are_refused_by_default(
    settings: Settings, redis_client: redis.Redis, store: JobStore, receiver: Receiver
) -> None:
    guarded = dataclasses.replace(settings, callback_allow_private=False)
    client = create_app(guarded).test_client()
    for url in (receiver.url, "http://10.0.0.7/hook", "http://169.254.169.254/latest", "http://[::1]:9/x"):
        response = submit(client, jsonl(items(1)), query=f"?model=unserved&callback_url={url}")
        assert response.status_code == 422, url
        assert "non-public" in response.get_json()["error"]["message"]
    assert data_keys(redis_client) == set()
    # Checked again when sending: a batch whose URL became private (say, by DNS) gets no request.
    batch = Batch.new("unserved", 1, "24h", None, receiver.url)
    BatchStore(store).create(batch, [["00000000-0000-4000-8000-0000000000aa", "q", None, 5, {}, "1"]])
    sender = CallbackSender(BatchStore(store), guarded.callback_secret, guarded.callback_allow_private)
    assert sender.deliver(batch.id) is False
    assert receiver.requests == []


def _stored_batch(store: JobStore, callback_url: str, tenant: str = "local") -> Batch:
    batch = Batch.new("unserved", 1, "24h", None, callback_url, tenant=tenant)
    BatchStore(store).create(batch, [["00000000-0000-4000-8000-0000000000ab", "q", None, 5, {}, "1"]])
    return batch


def test_a_url_read_two_ways_is_not_sent_to_the_address_the_guard_did_not_check(
    settings: Settings, redis_client: redis.Redis, store: JobStore, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # urlsplit reads the host as public.example (public), urllib3 as 127.0.0.1 (the receiver).
    real_getaddrinfo = socket.getaddrinfo

    def fake_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "public.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80))]
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    url = f"http://127.0.0.1:{receiver.port}\\@public.example/hook"
    client = create_app(dataclasses.replace(settings, callback_allow_private=False)).test_client()
    response = submit(client, jsonl(items(1)), query=f"?model=unserved&callback_url={url}")
    assert response.status_code == 422
    batch = _stored_batch(store, url)
    assert CallbackSender(BatchStore(store), settings.callback_secret, False).deliver(batch.id) is False
    assert receiver.requests == []


class SlowReceiver:
    """A loopback receiver that reads the request, then answers one byte every 0.2 s (for 30 s at most), or,
    with `endless_body`, answers 200 at once with a body that never ends. Records the attempt count stored in
    Redis when each request arrives."""

    def __init__(self, redis_client: redis.Redis, batch_id: str, endless_body: bool = False) -> None:
        self.attempts_seen: list[int] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.redis, self.batch_id, self.endless_body = redis_client, batch_id, endless_body
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            self.attempts_seen.append(int(self.redis.hget(redis_keys.callback_attempts(), self.batch_id) or 0))
            try:
                if self.endless_body:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        conn.sendall(b"x" * 65536)
                else:
                    answer = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000
                    for i in range(150):
                        conn.sendall(answer[i : i + 1])
                        time.sleep(0.2)
            except OSError:
                pass  # the sender gave up, as it should

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


def _deliver_in_thread(sender: CallbackSender, batch_id: str, wait_s: float) -> tuple[list[bool], float]:
    result: list[bool] = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: result.append(sender.deliver(batch_id)), daemon=True)
    thread.start()
    thread.join(wait_s)
    return result, time.monotonic() - started


def test_a_receiver_trickling_its_answer_cannot_hold_the_attempt_past_its_deadline(
    settings: Settings, redis_client: redis.Redis, store: JobStore
) -> None:
    batch = _stored_batch(store, "http://placeholder.invalid/")
    slow = SlowReceiver(redis_client, batch.id)
    store.redis.hset(redis_keys.batch(batch.id), "callback_url", json.dumps(slow.url))
    sender = CallbackSender(BatchStore(store), settings.callback_secret, True, deadline_s=1.0)
    result, elapsed = _deliver_in_thread(sender, batch.id, wait_s=10)
    assert result == [False] and elapsed < 2.5, (result, elapsed)
    # Counted before the request went out, and still counted after: the next attempt is number 2.
    assert slow.attempts_seen == [1]
    assert redis_client.hget(redis_keys.callback_attempts(), batch.id) == "1"
    assert redis_client.zscore(redis_keys.callbacks(), batch.id) is not None


def test_an_endless_answer_body_is_not_read_whole(
    settings: Settings, redis_client: redis.Redis, store: JobStore
) -> None:
    batch = _stored_batch(store, "http://placeholder.invalid/")
    endless = SlowReceiver(redis_client, batch.id, endless_body=True)
    store.redis.hset(redis_keys.batch(batch.id), "callback_url", json.dumps(endless.url))
    sender = CallbackSender(BatchStore(store), settings.callback_secret, True, deadline_s=5.0)
    result, elapsed = _deliver_in_thread(sender, batch.id, wait_s=10)
    assert result == [True] and elapsed < 2.0, (result, elapsed)


def test_each_tenant_has_its_own_signing_secret_and_signatures_expire(
    settings: Settings, redis_client: redis.Redis, store: JobStore
) -> None:
    assert settings.callback_secret is not None
    acme, other = tenant_secret(settings.callback_secret, "acme"), tenant_secret(settings.callback_secret, "other")
    assert acme != other and settings.callback_secret not in (acme, other)
    receiver = Receiver(failures=0)
    try:
        batch = _stored_batch(store, receiver.url, tenant="acme")
        assert CallbackSender(BatchStore(store), settings.callback_secret, True).deliver(batch.id) is True
    finally:
        receiver.server.shutdown()
    headers, body = receiver.requests[0]
    assert verify(acme, body, headers["Ragq-Signature"], now=time.time())
    assert not verify(other, body, headers["Ragq-Signature"], now=time.time())
    # A replay: the same signed body, presented 6 minutes later, is refused.
    assert not verify(acme, body, headers["Ragq-Signature"], now=time.time() + 360)
    # A signature made for another time does not verify either (the timestamp is signed).
    t = int(headers["Ragq-Signature"].split(",")[0][2:])
    forged = sign(acme, body, t).split(",")[1]
    assert not verify(acme, body, f"t={t + 100},{forged}", now=t + 100)


def test_the_callback_secret_endpoint_gives_each_tenant_its_own(settings: Settings, redis_client: redis.Redis) -> None:
    keyed = dataclasses.replace(settings, api_keys="acme:key-acme-0123456789,other:key-other-0123456789")
    client = create_app(keyed).test_client()
    assert client.get("/v1/callbacks/secret").status_code == 401
    assert settings.callback_secret is not None
    for tenant in ("acme", "other"):
        response = client.get("/v1/callbacks/secret", headers={"Authorization": f"Bearer key-{tenant}-0123456789"})
        assert response.status_code == 200
        assert response.get_json()["secret"] == tenant_secret(settings.callback_secret, tenant)
        assert response.get_json()["header"] == "Ragq-Signature"
    unset = create_app(dataclasses.replace(settings, callback_secret=None)).test_client()
    assert unset.get("/v1/callbacks/secret").status_code == 404
    assert "/v1/callbacks/secret" in client.get("/openapi.json").get_json()["paths"]
