"""Batch callbacks: signed, retried, and only to public addresses unless allowed."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from api import create_app
from cli.redis_server import free_port
from shared.batch_store import BatchStore
from shared.batches import Batch
from shared.config import Settings
from shared.store import JobStore
from tests.helpers import WorkerProcess, data_keys
from tests.test_batches import FAST, ended, items, jsonl, submit, wait_for_batch
from worker.callbacks import CallbackSender


class Receiver:
    """A callback receiver on loopback: fails its first `failures` requests with 500."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                self.send_response(500 if len(receiver.requests) <= receiver.failures else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = HTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


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
    assert settings.callback_secret is not None
    expected = "sha256=" + hmac.new(settings.callback_secret.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Ragq-Signature"], expected)
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
