"""Batch uploads are read as streams: bounded memory per upload, and a bounded number of uploads per API process."""

from __future__ import annotations

import dataclasses
import threading
import tracemalloc
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from api import create_app
from bench.upload_memory import bodies
from shared.batch_store import BatchStore
from shared.config import Settings


@pytest.mark.parametrize("content_type", ["text/csv", "application/x-ndjson"])
def test_an_upload_peaks_under_three_times_its_body(settings: Settings, redis_client: redis.Redis, content_type: str) -> None:
    client = create_app(dataclasses.replace(settings, max_batch_lines=1_000_000)).test_client()
    body = bodies(4.0)[content_type]
    tracemalloc.start()
    try:
        response = client.post("/v1/batches?model=unserved", data=body, content_type=content_type)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 202, response.get_json()
    assert peak <= 3 * len(body), f"peak {peak:,} bytes for a {len(body):,}-byte body"


def test_uploads_beyond_the_concurrency_limit_get_503_with_retry_after(
    settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(dataclasses.replace(settings, max_concurrent_uploads=1))
    reached, release = threading.Event(), threading.Event()
    original = BatchStore.stage

    def slow_stage(self: BatchStore, *args: Any, **kwargs: Any) -> Any:
        reached.set()
        release.wait(30)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BatchStore, "stage", slow_stage)
    body = b'{"custom_id": "a", "question": "q?"}'
    outcome: dict[str, int] = {}
    thread = threading.Thread(
        target=lambda: outcome.update(
            first=app.test_client().post("/v1/batches?model=unserved", data=body, content_type="application/x-ndjson").status_code
        )
    )
    thread.start()
    try:
        assert reached.wait(30)
        second = app.test_client().post("/v1/batches?model=unserved", data=body, content_type="application/x-ndjson")
        assert second.status_code == 503
        assert second.headers["Retry-After"]
        assert "too many batch uploads" in second.get_json()["error"]["message"]
    finally:
        release.set()
        thread.join(30)
    assert outcome["first"] == 202
    third: FlaskClient = app.test_client()
    assert third.post("/v1/batches?model=unserved", data=body.replace(b'"a"', b'"b"'), content_type="application/x-ndjson").status_code == 202
