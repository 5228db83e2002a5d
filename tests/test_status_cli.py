"""`ragq status`: its formatting, and the command over real HTTP against the API and the real Redis."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from werkzeug.serving import make_server

from api import create_app
from cli.main import main
from cli.status import format_status
from shared.config import Settings
from shared.jobs import Job
from worker.registry import WorkerActivity, WorkerRegistration, describe

ACME_KEY = "acme-key-0123456789abcdef"
BETA_KEY = "beta-key-0123456789abcdef"
NOW = 1_764_432_000.0


def document(**changes: Any) -> dict[str, Any]:
    model = {
        "id": "flan-t5-base",
        "object": "model",
        "created": 1_764_430_000,
        "owned_by": "ragq",
        "workers": [
            {
                "name": "ragq-flan-t5-base-4242@gpu1", "host": "gpu1", "device": "cuda:0", "dtype": "bfloat16",
                "max_batch_size": 64, "max_batch_tokens": 65536, "engine": "ready", "up_since": NOW - 3731,
                "jobs_done": 1520, "items_per_s": 41.25,
                "last_error": {"type": "timeout", "message": "job ran longer than 600 s", "at": NOW - 60},
            }
        ],
        "queues": {"interactive_queued": 3, "backlog_pending": 48210, "running": 128},
        # 410 items per 10 s, and none yet in the bucket that starts now.
        "throughput": [{"t": int(NOW) - 10 * k, "items": 410 if k else 0, "failed": 0} for k in range(89, -1, -1)],
        "batches": [
            {"id": "batch_1", "status": "in_progress", "total": 50000, "completed": 1770, "failed": 20, "progress": 0.0358,
             "items_per_s": 41.0, "eta_s": 1175.9}
        ],
        "recent_failures": [
            {"job_id": f"job-{i}", "batch_id": "batch_1", "type": "generation_error", "message": "x" * 300, "at": NOW - i}
            for i in range(7)
        ],
    }
    return model | changes


def test_status_lines_show_workers_queues_batches_and_failures() -> None:
    lines = format_status([document(), document(id="phi-3-mini-4k", workers=[], batches=[], recent_failures=[])], NOW)
    assert lines[0].startswith("flan-t5-base  1 worker  queued 3  backlog 48210  running 128  last minute 41.0/s")
    worker = lines[1]
    assert "ragq-flan-t5-base-4242@gpu1  cuda:0 bfloat16  ready  caps 64/65536  up 1:02:11  done 1520  41.2/s" in worker
    assert "last error timeout at 2025-11-29 15:59:00" in worker
    batch = lines[2]
    assert batch.startswith("  batch  batch_1  [") and "1790/50000" in batch and "41.0/s  ETA 19:36" in batch
    failures = [line for line in lines if line.startswith("  failed ")]
    assert len(failures) == 5 and "generation_error  job job-0  batch batch_1: " in failures[0]
    assert failures[0].endswith("...") and len(failures[0]) < 220
    assert "2 more failures" in lines[lines.index(failures[-1]) + 1]
    assert "phi-3-mini-4k  0 workers" in "\n".join(lines) and "  no live worker" in lines


@pytest.fixture
def api_url(settings: Settings, redis_client: redis.Redis) -> Iterator[str]:
    """The API with two tenants' keys over real HTTP on a loopback port."""
    app = create_app(dataclasses.replace(settings, api_keys=f"acme:{ACME_KEY},beta:{BETA_KEY}"))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def fake_worker(redis_client: redis.Redis) -> Iterator[WorkerRegistration]:
    """A registered worker of `unserved` that has answered two of acme's jobs and failed one."""
    entry = WorkerRegistration(
        redis_client, WorkerActivity("unserved", "fake@box"), describe("cpu", "float32", 8, 4096, host="box"), lambda: "ready", lambda: 0, 15
    )
    for job_id in ("a", "b", "c"):
        job = Job(id=job_id, status="running", model="unserved", question="q", created_at=time.time(), tenant="acme")  # type: ignore[arg-type]
        if job_id == "c":
            entry.activity.failed(job, "generation_error", "prompt too long")
        else:
            entry.activity.succeeded(job)
    entry.step()
    yield entry
    entry.deregister()


def ragq_status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], key: str, *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("RAGQ_API_KEY", key)
    code = main(["status", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_command_over_http(
    api_url: str, fake_worker: WorkerRegistration, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import requests

    lines = b"".join(json.dumps({"custom_id": str(i), "question": f"q{i}"}).encode() + b"\n" for i in range(4))
    response = requests.post(
        f"{api_url}/v1/batches?model=unserved", data=lines,
        headers={"Authorization": f"Bearer {ACME_KEY}", "Content-Type": "application/x-ndjson"}, timeout=30,
    )
    batch_id = response.json()["id"]

    code, out, _ = ragq_status(monkeypatch, capsys, ACME_KEY, "--model", "unserved", "--url", api_url)
    assert code == 0
    assert out.startswith("unserved  1 worker  queued 0  backlog 4  running 0  last minute ")
    assert "worker fake@box  cpu float32  ready  caps 8/4096" in out and "done 3" in out
    assert f"batch  {batch_id}  [" in out and "0/4" in out and "ETA --" in out
    assert "generation_error  job c: prompt too long" in out

    code, out, _ = ragq_status(monkeypatch, capsys, BETA_KEY, "--model", "unserved", "--url", api_url)
    assert code == 0 and batch_id not in out and "prompt too long" not in out and "worker fake@box" in out

    code, out, _ = ragq_status(monkeypatch, capsys, ACME_KEY, "--json", "--url", api_url)
    listing = json.loads(out)
    assert listing["object"] == "list" and "unserved" in [m["id"] for m in listing["data"]]

    code, out, err = ragq_status(monkeypatch, capsys, ACME_KEY, "--model", "nope", "--url", api_url)
    assert code == 2 and "HTTP 404: model_not_found" in err


def test_openai_clients_list_and_retrieve_models(api_url: str, settings: Settings) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{api_url}/v1", api_key=ACME_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == settings.model_names
    model = client.models.retrieve("tiny-t5")
    assert model.id == "tiny-t5" and model.object == "model" and model.owned_by == "ragq"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
