"""Prometheus metrics: the API's `/metrics` and each worker's, scraped and parsed with prometheus_client's parser."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from api import create_app
from cli import processes
from cli.redis_server import free_port
from shared.config import Settings
from shared.models import ModelSpec
from shared.store import JobStore
from tests.helpers import child_env, start_worker
from tests.test_usage import ACME_KEY, BETA_KEY, OPS_KEY, auth, finished_job, keyed_client

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 when absent (a counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


def scrape(client: FlaskClient, **headers: str) -> Samples:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.data
    assert response.content_type.startswith("text/plain")
    return parse(response.get_data(as_text=True))


def test_requests_are_counted_by_url_rule_never_by_raw_path(client: FlaskClient, redis_client: redis.Redis) -> None:
    before = scrape(client)
    route = "/v1/jobs/<job_id>"
    for job_id in ("a", "b", "c"):
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    client.get("/no/such/path")
    after = scrape(client)
    assert value(after, "ragq_api_requests_total", route=route, method="GET", status="404") - value(
        before, "ragq_api_requests_total", route=route, method="GET", status="404"
    ) == 3
    assert not any("/v1/jobs/a" in dict(labels).get("route", "") for _, labels in after)
    assert value(after, "ragq_api_requests_total", route="unmatched", method="GET", status="404") >= 1
    assert total(after, "ragq_api_request_duration_seconds_count", route=route) - total(
        before, "ragq_api_request_duration_seconds_count", route=route
    ) == 3


def test_submissions_queue_depth_and_usage_are_exported(client: FlaskClient, redis_client: redis.Redis, store: JobStore) -> None:
    before = scrape(client)
    # "unserved" has no worker: its jobs stay queued.
    for i in range(3):
        assert client.post("/v1/jobs", json={"question": f"q{i}", "model": "unserved"}).status_code == 202
    batch = client.post(
        "/v1/batches?model=unserved", data=b'{"custom_id": "1", "question": "a"}\n{"custom_id": "2", "question": "b"}\n', content_type="application/jsonl"
    )
    assert batch.status_code == 202, batch.json
    finished_job(store, "local", 12, 5)
    after = scrape(client)
    submitted = "ragq_jobs_submitted_total"
    assert value(after, submitted, model="unserved", kind="job") - value(before, submitted, model="unserved", kind="job") == 3
    assert value(after, submitted, model="unserved", kind="batch_item") - value(before, submitted, model="unserved", kind="batch_item") == 2
    assert value(after, "ragq_queue_depth", model="unserved", queue="interactive") == 3
    assert value(after, "ragq_queue_depth", model="unserved", queue="backlog") == 2
    assert value(after, "ragq_queue_depth", model="tiny-t5", queue="interactive") == 0
    assert value(after, "ragq_jobs_running", model="unserved") == 0
    assert value(after, "ragq_usage_jobs_total", tenant="local", model="tiny-t5") == 1
    assert value(after, "ragq_usage_prompt_tokens_total", tenant="local", model="tiny-t5") == 12
    assert value(after, "ragq_usage_completion_tokens_total", tenant="local", model="tiny-t5") == 5
    assert value(after, "ragq_usage_generate_seconds_total", tenant="local", model="tiny-t5") == pytest.approx(0.1)


def test_metrics_can_require_an_admin_key(settings: Settings, redis_client: redis.Redis) -> None:
    open_client = keyed_client(settings)
    assert open_client.get("/metrics").status_code == 200
    guarded = create_app(
        dataclasses.replace(
            settings, api_keys=f"acme:{ACME_KEY},beta:{BETA_KEY},ops:{OPS_KEY}", admin_tenants="ops", metrics_require_key=True
        )
    ).test_client()
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers=auth(ACME_KEY)).status_code == 403
    assert guarded.get("/metrics", headers=auth(OPS_KEY)).status_code == 200


def test_metrics_answer_while_redis_is_away_and_count_the_error(settings: Settings) -> None:
    away = create_app(dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()
    samples = scrape(away)
    assert value(samples, "ragq_redis_errors_total", component="metrics") >= 1
    assert not any(name == "ragq_queue_depth" for name, _ in samples)


def test_a_worker_whose_metrics_port_is_taken_takes_the_next_free_one(settings: Settings) -> None:
    from worker import metrics as worker_metrics

    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        got = worker_metrics.start(dataclasses.replace(settings, metrics_port=port, metrics_host="127.0.0.1"), "w@h")
    finally:
        taken.close()
    assert got is not None and port < got < port + 32
    samples = scrape_worker(got)
    assert value(samples, "ragq_worker_up", model="tiny-t5", worker="w@h") == 1
    assert worker_metrics.start(dataclasses.replace(settings, metrics_port=0), "w@h") is None


# -- with real processes -------------------------------------------------------------------------------------

MODEL = "tiny-t5-metrics"
# Short answers: a random tiny model otherwise writes up to RAGQ_MAX_NEW_TOKENS, slow on a busy machine.
SHORT = {"max_new_tokens": 8}


@pytest.fixture
def metrics_settings(settings: Settings, tiny_models: dict[str, Path]) -> Settings:
    """The session's settings plus a model only this test's worker serves, and a free metrics port."""
    extra = (*settings.extra_models, ModelSpec(MODEL, str(tiny_models["t5"])))
    return dataclasses.replace(settings, extra_models=extra, metrics_port=free_port())


def scrape_worker(port: int) -> Samples:
    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200
    return parse(response.text)


@pytest.mark.slow
def test_counts_move_as_a_real_worker_answers_jobs(metrics_settings: Settings, redis_client: redis.Redis) -> None:
    client = create_app(metrics_settings).test_client()
    interactive, items = 6, 10
    job_ids = []
    for i in range(interactive):
        response = client.post("/v1/jobs", json={"question": f"How do I join the course? {i}", "model": MODEL, "params": SHORT})
        job_ids.append(response.json["id"])
    lines = "".join(f'{{"custom_id": "{i}", "question": "Can I still enroll? {i}", "params": {{"max_new_tokens": 8}}}}\n' for i in range(items)).encode()
    batch = client.post(f"/v1/batches?model={MODEL}", data=lines, content_type="application/jsonl").json
    api = scrape(client)
    assert value(api, "ragq_jobs_submitted_total", model=MODEL, kind="job") == interactive
    assert value(api, "ragq_jobs_submitted_total", model=MODEL, kind="batch_item") == items
    # No worker yet: everything waits.
    assert value(api, "ragq_queue_depth", model=MODEL, queue="interactive") == interactive
    assert value(api, "ragq_queue_depth", model=MODEL, queue="backlog") == items

    worker = start_worker(metrics_settings, MODEL, redis_client)
    try:
        port = metrics_settings.metrics_port
        seen_finished = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            samples = scrape_worker(port)
            seen_finished.append(value(samples, "ragq_jobs_finished_total", model=MODEL, status="succeeded"))
            if seen_finished[-1] == interactive + items:
                break
            time.sleep(0.05)
        assert seen_finished[-1] == interactive + items, worker.log()
        assert seen_finished == sorted(seen_finished), "a counter went down"
        jobs = [client.get(f"/v1/jobs/{job_id}?wait=30").json for job_id in job_ids]
        results = client.get(f"/v1/batches/{batch['id']}/results").get_data(as_text=True).splitlines()
        assert all(job["status"] == "succeeded" for job in jobs)
        usages = [job["usage"] for job in jobs] + [json.loads(line)["usage"] for line in results]
        assert len(usages) == interactive + items
        assert value(samples, "ragq_prompt_tokens_total", model=MODEL) == sum(u["prompt_tokens"] for u in usages)
        assert value(samples, "ragq_generated_tokens_total", model=MODEL) == sum(u["completion_tokens"] for u in usages)
        assert value(samples, "ragq_microbatch_size_sum", model=MODEL) == interactive + items
        assert 1 <= value(samples, "ragq_microbatch_size_count", model=MODEL) <= interactive + items
        assert value(samples, "ragq_generate_duration_seconds_count", model=MODEL) >= value(
            samples, "ragq_microbatch_size_count", model=MODEL
        )
        assert value(samples, "ragq_queue_wait_seconds_count", model=MODEL, priority="interactive") == interactive
        assert value(samples, "ragq_queue_wait_seconds_count", model=MODEL, priority="backlog") == items
        assert total(samples, "ragq_worker_up", model=MODEL) == 1
        assert value(samples, "ragq_engine_restarts_total", model=MODEL) == 0
        api = scrape(client)
        assert value(api, "ragq_queue_depth", model=MODEL, queue="interactive") == 0
        assert value(api, "ragq_queue_depth", model=MODEL, queue="backlog") == 0
        assert value(api, "ragq_usage_jobs_total", tenant="local", model=MODEL) == interactive + items
        assert value(api, "ragq_usage_prompt_tokens_total", tenant="local", model=MODEL) == sum(u["prompt_tokens"] for u in usages)
    finally:
        worker.stop()


@pytest.mark.slow
def test_several_api_processes_report_the_same_counts(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    """gunicorn with two processes: whichever one a scrape reaches, it reports the counts of both."""
    port = free_port()
    # The API makes its shared directory under TMPDIR: here, where the test can see which processes wrote.
    api = subprocess.Popen(
        [sys.executable, "-m", "api", "--port", str(port), "--processes", "2"],
        env=child_env(settings, TMPDIR=str(tmp_path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline and api.poll() is None, "the API did not start"
            time.sleep(0.2)

        def submit(i: int) -> int:
            # A connection each: both processes accept some.
            body = {"question": f"q{i}", "model": "unserved"}
            return requests.post(f"{url}/v1/jobs", json=body, headers={"Connection": "close"}, timeout=10).status_code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(submit, range(40))) == [202] * 40
        [shared] = tmp_path.glob("ragq-api-metrics-*")
        writers = {path.stem.rpartition("_")[2] for path in shared.glob("counter_*.db")}
        assert len(writers) == 2, "both processes should have answered some of the 40 requests"
        for _ in range(8):
            samples = parse(requests.get(f"{url}/metrics", headers={"Connection": "close"}, timeout=5).text)
            assert value(samples, "ragq_jobs_submitted_total", model="unserved", kind="job") == 40
            assert value(samples, "ragq_api_requests_total", route="/v1/jobs", method="POST", status="202") == 40
    finally:
        processes.stop_groups([api])
    assert not shared.exists(), "the shared directory is removed when the API stops"
