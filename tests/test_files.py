"""`/v1/files`, batches from an uploaded file (OpenAI's form) and `/v1/chat/completions` refusals, without a worker."""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from api import create_app
from shared import redis_keys
from shared.config import Settings
from shared.models import ModelSpec
from tests.helpers import data_keys

MODEL = "idle-t5"
KEYS = "alice:sk-alice-0123456789,bob:sk-bob-0123456789"
ALICE = {"Authorization": "Bearer sk-alice-0123456789"}
BOB = {"Authorization": "Bearer sk-bob-0123456789"}


def make_client(settings: Settings, **overrides: Any) -> FlaskClient:
    """Default model `idle-t5`: no worker consumes its queue. Two tenants."""
    idle = dataclasses.replace(
        settings, default_model=ModelSpec(MODEL, settings.default_model.source), api_keys=KEYS, **overrides
    )
    return create_app(idle).test_client()


@pytest.fixture
def client(settings: Settings, redis_client: redis.Redis) -> FlaskClient:
    return make_client(settings)


def chat_line(custom_id: str, question: str = "How do I join?", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}], **body},
    }


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in lines)


def upload(client: FlaskClient, content: bytes, purpose: str = "batch", headers: dict[str, str] = ALICE, name: str = "in.jsonl") -> Any:
    return client.post(
        "/v1/files", data={"purpose": purpose, "file": (io.BytesIO(content), name)}, headers=headers, content_type="multipart/form-data"
    )


def create_batch(client: FlaskClient, body: dict[str, Any], headers: dict[str, str] = ALICE) -> Any:
    return client.post("/v1/batches", json=body, headers=headers)


# --- files ---------------------------------------------------------------------------------------------------------


def test_upload_returns_openai_file_object_and_content_round_trips(client: FlaskClient) -> None:
    # Over one 64 KiB chunk, with multi-byte characters straddling chunk boundaries.
    content = jsonl([chat_line(f"q{i}", "Wie läuft das? ✓ " * 20) for i in range(400)])
    assert len(content) > 3 * 64 * 1024
    response = upload(client, content)
    assert response.status_code == 200, response.get_json()
    file = response.get_json()
    assert file["id"].startswith("file-") and file["object"] == "file"
    assert file["bytes"] == len(content) and file["filename"] == "in.jsonl" and file["purpose"] == "batch"
    assert isinstance(file["created_at"], int) and file["status"] == "processed"
    assert client.get(f"/v1/files/{file['id']}", headers=ALICE).get_json() == file
    downloaded = client.get(f"/v1/files/{file['id']}/content", headers=ALICE)
    assert downloaded.status_code == 200 and downloaded.get_data() == content
    listed = client.get("/v1/files", headers=ALICE).get_json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [file["id"]]


def test_another_tenants_file_is_not_found(client: FlaskClient) -> None:
    file = upload(client, jsonl([chat_line("a")])).get_json()
    for path in (f"/v1/files/{file['id']}", f"/v1/files/{file['id']}/content"):
        assert client.get(path, headers=BOB).status_code == 404
    assert client.delete(f"/v1/files/{file['id']}", headers=BOB).status_code == 404
    assert client.get("/v1/files", headers=BOB).get_json()["data"] == []
    refused = create_batch(client, {"input_file_id": file["id"], "endpoint": "/v1/chat/completions"}, headers=BOB)
    assert refused.status_code == 404


def test_delete_removes_the_file_and_its_storage(client: FlaskClient, redis_client: redis.Redis) -> None:
    before = data_keys(redis_client)
    file = upload(client, jsonl([chat_line("a")])).get_json()
    deleted = client.delete(f"/v1/files/{file['id']}", headers=ALICE)
    assert deleted.status_code == 200 and deleted.get_json() == {"id": file["id"], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{file['id']}", headers=ALICE).status_code == 404
    assert not redis_client.exists(redis_keys.file(file["id"]), redis_keys.file_chunks(file["id"]))
    assert not redis_client.zcard(redis_keys.tenant_files("alice"))
    assert data_keys(redis_client) <= before | {redis_keys.tenant_files("alice")}


@pytest.mark.parametrize(
    ("purpose", "content", "status"),
    [
        ("fine-tune", b'{"a": 1}\n', 400),
        ("assistants", b'{"a": 1}\n', 400),
        ("batch", b"\xff\xfe not utf-8\n", 422),
    ],
)
def test_refused_uploads_leave_nothing(client: FlaskClient, redis_client: redis.Redis, purpose: str, content: bytes, status: int) -> None:
    before = data_keys(redis_client)
    response = upload(client, content, purpose=purpose)
    assert response.status_code == status
    assert set(response.get_json()["error"]) >= {"type", "message"}
    assert data_keys(redis_client) == before


def test_upload_without_a_file_part_or_not_multipart_is_400(client: FlaskClient) -> None:
    assert client.post("/v1/files", data={"purpose": "batch"}, headers=ALICE, content_type="multipart/form-data").status_code == 400
    assert client.post("/v1/files", json={"purpose": "batch"}, headers=ALICE).status_code == 400


def test_upload_over_the_batch_body_limit_is_413_and_leaves_nothing(settings: Settings, redis_client: redis.Redis) -> None:
    client = make_client(settings, max_batch_bytes=4096)
    before = data_keys(redis_client)
    response = upload(client, b"x" * 8192)
    assert response.status_code == 413
    assert data_keys(redis_client) == before


def test_tenant_file_caps_are_enforced_and_deleting_frees_room(settings: Settings, redis_client: redis.Redis) -> None:
    client = make_client(settings, max_files_per_tenant=2, max_file_bytes_per_tenant=2048)
    first = upload(client, b"a" * 100).get_json()
    upload(client, b"b" * 100)
    refused = upload(client, b"c" * 100)
    assert refused.status_code == 429 and refused.get_json()["error"]["details"] == {"max_files_per_tenant": 2}
    assert upload(client, b"d" * 100, headers=BOB).status_code == 200  # another tenant's room is its own
    client.delete(f"/v1/files/{first['id']}", headers=ALICE)
    too_big = upload(client, b"e" * 2000)
    assert too_big.status_code == 429 and too_big.get_json()["error"]["details"]["max_file_bytes_per_tenant"] == 2048
    assert upload(client, b"f" * 100).status_code == 200
    assert len(client.get("/v1/files", headers=ALICE).get_json()["data"]) == 2


# --- batches from a file -------------------------------------------------------------------------------------------


def test_batch_from_file_maps_params_and_refuses_unsupported_lines_one_by_one(client: FlaskClient, redis_client: redis.Redis) -> None:
    lines = [
        chat_line("ok-1", max_tokens=7, temperature=0.5, top_p=0.9, course="ragq"),
        chat_line("tools", tools=[{"type": "function", "function": {"name": "f"}}]),
        chat_line("ok-2", max_completion_tokens=5, temperature=0),
        {**chat_line("embed"), "url": "/v1/embeddings"},
        chat_line("n2", n=2),
        chat_line("streamed", stream=True),
        chat_line("too-many-tokens", max_tokens=10**6),
    ]
    file = upload(client, jsonl(lines)).get_json()
    response = create_batch(
        client, {"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": {"run": "1"}}
    )
    assert response.status_code == 202, response.get_json()
    batch = response.get_json()
    assert batch["object"] == "batch" and batch["status"] == "in_progress" and batch["endpoint"] == "/v1/chat/completions"
    assert batch["input_file_id"] == file["id"] and batch["metadata"] == {"run": "1"} and batch["model"] == MODEL
    assert isinstance(batch["created_at"], int) and isinstance(batch["expires_at"], int)
    assert batch["output_file_id"] is None and batch["error_file_id"] is None
    counts = batch["request_counts"]
    assert (counts["total"], counts["completed"], counts["failed"], counts["queued"]) == (7, 0, 5, 2)
    # Quota: only the runnable items are outstanding.
    assert redis_client.get(redis_keys.tenant_outstanding("alice")) == "2"
    items = [json.loads(line) for line in client.get(f"/v1/batches/{batch['id']}/results", headers=ALICE).get_data().splitlines()]
    by_id = {item["custom_id"]: item for item in items}
    assert [item["custom_id"] for item in items] == [line["custom_id"] for line in lines]
    job = client.get(f"/v1/jobs/{by_id['ok-1']['job_id']}", headers=ALICE).get_json()
    assert job["question"] == "How do I join?" and job["course"] == "ragq"
    assert job["params"] == {"max_new_tokens": 7, "do_sample": True, "temperature": 0.5, "top_p": 0.9}
    job2 = client.get(f"/v1/jobs/{by_id['ok-2']['job_id']}", headers=ALICE).get_json()
    assert job2["params"] == {"max_new_tokens": 5, "do_sample": False}
    assert by_id["tools"]["status"] == "failed" and "tools" in by_id["tools"]["error"]["message"]
    assert by_id["tools"]["error"]["type"] == "unsupported_parameter"
    assert "/v1/embeddings" in by_id["embed"]["error"]["message"]
    assert "n must be 1" in by_id["n2"]["error"]["message"] and "stream" in by_id["streamed"]["error"]["message"]
    assert "max_tokens" in by_id["too-many-tokens"]["error"]["message"]
    # Cancelled: ended, so both files exist; the error file holds the refused and the cancelled lines.
    cancelled = client.post(f"/v1/batches/{batch['id']}/cancel", headers=ALICE).get_json()
    assert cancelled["status"] == "cancelled" and cancelled["output_file_id"] is None
    errors = client.get(f"/v1/files/{cancelled['error_file_id']}/content", headers=ALICE)
    error_lines = [json.loads(line) for line in errors.get_data().splitlines()]
    assert [line["custom_id"] for line in error_lines] == [line["custom_id"] for line in lines]
    tools = next(line for line in error_lines if line["custom_id"] == "tools")
    assert tools["response"]["status_code"] == 400 and tools["error"]["code"] == "unsupported_parameter"
    assert next(line for line in error_lines if line["custom_id"] == "ok-1")["error"]["code"] == "batch_cancelled"
    meta = client.get(f"/v1/files/{cancelled['error_file_id']}", headers=ALICE).get_json()
    assert meta["bytes"] == len(errors.get_data()) and meta["purpose"] == "batch_error"


def test_batch_course_defaults_to_metadata_course(client: FlaskClient) -> None:
    file = upload(client, jsonl([chat_line("a"), chat_line("b", course="other")])).get_json()
    batch = create_batch(client, {"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "metadata": {"course": "ragq"}}).get_json()
    items = client.get(f"/v1/batches/{batch['id']}/results", headers=ALICE).get_data().splitlines()
    courses = [client.get(f"/v1/jobs/{json.loads(i)['job_id']}", headers=ALICE).get_json()["course"] for i in items]
    assert courses == ["ragq", "other"]


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\nnot json\n', 422, "line(s)"),
        (jsonl([chat_line("a"), chat_line("a")]), 422, "line(s)"),
        (jsonl([{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}]), 422, "line(s)"),
        (jsonl([chat_line("a", tools=[]), chat_line("b", stream=True)]), 422, "no line of the batch can run"),
        (b"\n\n", 422, "no lines"),
    ],
)
def test_bad_input_files_are_refused_whole_and_leave_nothing(
    client: FlaskClient, redis_client: redis.Redis, content: bytes, status: int, message: str
) -> None:
    file = upload(client, content).get_json()
    before = data_keys(redis_client)
    response = create_batch(client, {"input_file_id": file["id"], "endpoint": "/v1/chat/completions"})
    assert response.status_code == status, response.get_json()
    assert message in response.get_json()["error"]["message"]
    assert data_keys(redis_client) - before <= {k for k in data_keys(redis_client) if k.startswith("ragq:tenant:alice:rate")}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"}, 404),
        ({"input_file_id": "FILE", "endpoint": "/v1/embeddings"}, 400),
        ({"input_file_id": "FILE", "endpoint": "/v1/chat/completions", "completion_window": "forever"}, 422),
        ({"input_file_id": "FILE", "endpoint": "/v1/chat/completions", "tools": []}, 422),
    ],
)
def test_bad_batch_requests_are_refused(client: FlaskClient, redis_client: redis.Redis, body: dict[str, Any], status: int) -> None:
    file = upload(client, jsonl([chat_line("a")])).get_json()
    body = {k: (file["id"] if v == "FILE" else v) for k, v in body.items()}
    before = data_keys(redis_client)
    assert create_batch(client, body).status_code == status
    assert not {k for k in data_keys(redis_client) - before if k.startswith(("ragq:batch", "ragq:job"))}


def test_output_files_of_unended_or_unknown_batches_are_not_found(client: FlaskClient) -> None:
    file = upload(client, jsonl([chat_line("a")])).get_json()
    batch = create_batch(client, {"input_file_id": file["id"], "endpoint": "/v1/chat/completions"}).get_json()
    hex_id = batch["id"].removeprefix("batch_")
    assert client.get(f"/v1/files/file-out-{hex_id}/content", headers=ALICE).status_code == 404
    assert client.get(f"/v1/files/file-err-{hex_id}", headers=BOB).status_code == 404
    assert client.get("/v1/files/file-out-nothing/content", headers=ALICE).status_code == 404
    assert client.delete(f"/v1/files/file-out-{hex_id}", headers=ALICE).status_code == 409


# --- chat completions ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"stream": True}, "stream"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"n": 3}, "n must be 1"),
        ({"messages": [{"role": "system", "content": "x"}]}, "no user message"),
        ({"model": "gpt-4o"}, "model"),
        ({"temperature": 9.0}, "temperature"),
    ],
)
def test_chat_completion_refuses_what_it_cannot_honour(client: FlaskClient, redis_client: redis.Redis, body: dict[str, Any], fragment: str) -> None:
    before = data_keys(redis_client)
    request = {"model": MODEL, "messages": [{"role": "user", "content": "How do I join?"}], **body}
    response = client.post("/v1/chat/completions", json=request, headers=ALICE)
    assert response.status_code == 400, response.get_json()
    assert fragment in response.get_json()["error"]["message"]
    assert not {k for k in data_keys(redis_client) - before if k.startswith("ragq:job")}


def test_chat_completion_without_a_worker_for_the_model_is_503_at_once(client: FlaskClient, redis_client: redis.Redis) -> None:
    request = {"model": MODEL, "messages": [{"role": "user", "content": "How do I join?"}]}
    response = client.post("/v1/chat/completions", json=request, headers=ALICE)
    assert response.status_code == 503 and MODEL in response.get_json()["error"]["message"]
    assert not redis_client.keys("ragq:job:*")


def test_chat_completion_without_an_answer_in_time_is_504_and_cancels_the_job(settings: Settings, redis_client: redis.Redis) -> None:
    from shared.store import announce_worker

    client = make_client(settings, chat_timeout_s=1)
    # A worker announced for the model that never takes the job (no process consumes its queue).
    announce_worker(redis_client, "ragq-absent@nowhere", MODEL)
    request = {"model": MODEL, "messages": [{"role": "user", "content": "How do I join?"}]}
    response = client.post("/v1/chat/completions", json=request, headers=ALICE)
    assert response.status_code == 504 and response.get_json()["error"]["type"] == "timeout"
    job = client.get(f"/v1/jobs/{response.get_json()['error']['details']['job_id']}", headers=ALICE).get_json()
    assert job["status"] == "cancelled"
    assert not redis_client.get(redis_keys.tenant_outstanding("alice"))


def test_file_listing_pages_with_has_more(client: FlaskClient) -> None:
    ids = [upload(client, jsonl([chat_line(str(i))])).get_json()["id"] for i in range(3)]
    page = client.get("/v1/files?limit=2", headers=ALICE).get_json()
    assert page["has_more"] is True and len(page["data"]) == 2 and set(f["id"] for f in page["data"]) <= set(ids)
    assert client.get("/v1/files?limit=0", headers=ALICE).status_code == 422
