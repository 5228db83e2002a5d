"""The real `openai` Python package, unchanged but for `base_url` and the API key, against ragq under gunicorn with a
real worker: the calls a user's Batch API script makes, then `ragq batch retry` from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from cli.redis_server import free_port
from shared.config import Settings
from tests.helpers import WorkerProcess, child_env, wait_for_api

openai = pytest.importorskip("openai", reason="the openai package is a test dependency (pip install -e '.[test]')")

API_KEY = "sk-ragq-sdk-test-0123456789"
API_START_TIMEOUT_S = 60
BATCH_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def api_url(settings: Settings) -> Iterator[str]:
    """`python -m api` (gunicorn) on a free loopback port, with one tenant's key."""
    port = free_port()
    env = child_env(settings, RAGQ_PORT=str(port), RAGQ_API_KEYS=f"sdk:{API_KEY}")
    api = subprocess.Popen([sys.executable, "-m", "api"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_api(url, api, API_START_TIMEOUT_S)
        yield url
    finally:
        api.terminate()
        api.wait(10)


@pytest.fixture
def client(api_url: str, t5_worker: WorkerProcess, redis_client: Any) -> Any:
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key=API_KEY, max_retries=0)


def line(custom_id: str, model: str = "tiny-t5", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": "How do I run ragq?"}], "max_tokens": 8, **body},
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in lines)


def wait_until_ended(client: Any, batch_id: str) -> Any:
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)


def chat_once_registered(client: Any) -> Any:
    """One chat completion; 503 (no live worker known for the model) is retried while the worker registers again
    after a test emptied Redis."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return client.chat.completions.create(
                model="tiny-t5", messages=[{"role": "user", "content": "How do I run ragq?"}], max_tokens=8, extra_body={"course": "ragq"}
            )
        except openai.InternalServerError as exc:
            assert exc.status_code == 503 and time.monotonic() < deadline, exc
            time.sleep(0.5)


def test_a_batch_api_script_runs_unchanged(client: Any) -> None:
    lines = [line("a"), line("b", temperature=0), line("with-tools", tools=[{"type": "function", "function": {"name": "f"}}]), line("c")]
    uploaded = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(jsonl(lines)) and uploaded.purpose == "batch"
    assert client.files.retrieve(uploaded.id).filename == "requests.jsonl"

    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"course": "ragq", "run": "sdk"},
    )
    assert batch.status == "in_progress" and batch.input_file_id == uploaded.id
    done = wait_until_ended(client, batch.id)
    assert done.status == "completed" and done.completed_at is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 3, 1)
    assert done.metadata == {"course": "ragq", "run": "sdk"}
    assert batch.id in [b.id for b in client.batches.list(limit=10)]

    output = [json.loads(text) for text in client.files.content(done.output_file_id).text.splitlines()]
    assert [item["custom_id"] for item in output] == ["a", "b", "c"]
    for item in output:
        assert item["error"] is None and item["response"]["status_code"] == 200
        completion = item["response"]["body"]
        assert completion["object"] == "chat.completion" and completion["model"] == "tiny-t5"
        assert isinstance(completion["choices"][0]["message"]["content"], str)
        assert completion["usage"]["completion_tokens"] > 0 and completion["ragq"]["sources"]
    errors = [json.loads(text) for text in client.files.content(done.error_file_id).text.splitlines()]
    assert [item["custom_id"] for item in errors] == ["with-tools"]
    assert errors[0]["response"]["status_code"] == 400 and "tools" in errors[0]["error"]["message"]


def test_cancel_lists_models_and_answers_a_chat_completion(client: Any) -> None:
    # No worker serves `unserved`: its items wait until cancelled.
    uploaded = client.files.create(file=("idle.jsonl", jsonl([line("x", model="unserved"), line("y", model="unserved")])), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    ended = wait_until_ended(client, batch.id)
    assert ended.status == "cancelled" and ended.output_file_id is None
    errors = [json.loads(text) for text in client.files.content(ended.error_file_id).text.splitlines()]
    assert {item["error"]["code"] for item in errors} == {"batch_cancelled"}
    assert client.files.delete(uploaded.id).deleted

    assert "tiny-t5" in [model.id for model in client.models.list()]

    completion = chat_once_registered(client)
    assert completion.object == "chat.completion" and completion.choices[0].message.role == "assistant"
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.usage.completion_tokens > 0 and completion.usage.total_tokens > completion.usage.completion_tokens
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-t5", messages=[{"role": "user", "content": "q"}], stream=True)


def test_ragq_batch_retry_resubmits_only_the_failed_item(client: Any, api_url: str, settings: Settings) -> None:
    too_long = " ".join(f"w{i}" for i in range(400))
    failing = line("too-long")
    failing["body"]["messages"] = [{"role": "user", "content": too_long}]
    uploaded = client.files.create(file=("mixed.jsonl", jsonl([line("fine"), failing, line("refused", n=2)])), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_until_ended(client, batch.id)
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)

    env = child_env(settings, RAGQ_API_KEY=API_KEY)
    ran = subprocess.run(
        [sys.executable, "-m", "cli", "batch", "retry", batch.id, "--url", api_url], env=env, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    retry_id = ran.stdout.split()[0]
    assert f"retries {batch.id}: 1 item(s)" in ran.stdout
    retried = wait_until_ended(client, retry_id)
    assert retried.retry_of == batch.id and retried.input_file_id == uploaded.id
    assert client.batches.retrieve(batch.id).retried_by == [retry_id]
    errors = [json.loads(text) for text in client.files.content(retried.error_file_id).text.splitlines()]
    assert [item["custom_id"] for item in errors] == ["too-long"]

    headers = {"Authorization": f"Bearer {API_KEY}"}
    merged = requests.get(f"{api_url}/v1/batches/{batch.id}/results", params={"merged": "true"}, headers=headers, timeout=10)
    items = [json.loads(text) for text in merged.text.splitlines()]
    assert [(i["custom_id"], i["batch_id"]) for i in items] == [("fine", batch.id), ("too-long", retry_id), ("refused", batch.id)]
    # Only the refused line is left in the retry's failures of that kind: nothing of type `expired` to retry.
    nothing = requests.post(f"{api_url}/v1/batches/{batch.id}/retry", params={"error_type": "expired"}, headers=headers, timeout=10)
    assert nothing.status_code == 409 and "nothing to retry" in nothing.json()["error"]["message"]
