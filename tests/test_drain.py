"""Draining a worker for maintenance: SIGTERM to one of two workers under load loses nothing and repeats nothing.

SIGTERM is Celery's warm shutdown: the worker stops taking messages at once, so everything still in Redis goes
to the other worker; it finishes the jobs it holds (the microbatch on the model and the one prepared behind it)
and exits; a message it had taken and not started goes back to its queue when its channel closes. No job waits
for the visibility timeout or for the reaper.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
import redis

from api import create_app
from shared.config import Settings
from shared.models import ModelSpec
from tests.helpers import start_worker
from worker.simulated import write_spec_dir

pytestmark = pytest.mark.slow

MODEL = "sim-drain"
# About 0.6 s of simulated device time per microbatch of 4: long enough to SIGTERM mid-work, short for a test.
STEP_MS = 50.0
NEW_TOKENS = 10
MICROBATCH = 4
JOBS = 48


def drain_settings(settings: Settings, tmp_path: Path) -> Settings:
    spec = write_spec_dir(tmp_path / "sim", "flan-t5-xl-h200", cpu_share=0.0, step_base_ms=STEP_MS)
    return dataclasses.replace(
        settings,
        extra_models=(*settings.extra_models, ModelSpec(MODEL, str(spec))),
        engine="thread",
        max_microbatch_size=MICROBATCH,
        execution_ledger=tmp_path / "ledger.jsonl",
    )


def test_sigterm_drains_one_of_two_workers_under_load_losing_and_repeating_nothing(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    settings = drain_settings(settings, tmp_path)
    client = create_app(settings).test_client()
    draining = start_worker(settings, MODEL, redis_client)
    staying = start_worker(settings, MODEL, redis_client)
    try:
        params = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
        ids = [
            client.post("/v1/jobs", json={"question": f"How do I enrol? {i}", "model": MODEL, "params": params}).get_json()["id"]
            for i in range(JOBS)
        ]
        prefix = f"ragq-{MODEL}-{draining.process.pid}@"
        deadline = time.monotonic() + 60
        while not any((client.get(f"/v1/jobs/{j}").get_json()["worker"] or "").startswith(prefix) for j in ids):
            assert time.monotonic() < deadline, "the worker to drain never took a job"
            time.sleep(0.05)
        sigterm_at, exited_after_s = draining.drain()
        done = [client.get(f"/v1/jobs/{j}?wait=60").get_json() for j in ids]
    finally:
        draining.stop()
        staying.stop()

    # Nothing lost, nothing run twice: every job succeeded at its first attempt, with one run and one result.
    assert [j["status"] for j in done] == ["succeeded"] * JOBS, [j.get("error") for j in done]
    assert {j["attempts"] for j in done} == {1}
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert Counter(e["job_id"] for e in ledger if e["event"] == "run") == Counter(ids)
    assert Counter(e["job_id"] for e in ledger if e["event"] == "result") == Counter(ids)
    # Both workers answered; the draining one took nothing new once told to stop.
    by_drained = [j for j in done if j["worker"].startswith(prefix)]
    assert by_drained and len(by_drained) < JOBS
    started = [datetime.fromisoformat(j["started_at"].replace("Z", "+00:00")).timestamp() for j in by_drained]
    assert max(started) < sigterm_at + 1.5
    # It finished what it held (at most the microbatch on the model and the one prepared behind it, about
    # 1.3 s) and left: seconds, far below the visibility timeout (120 s here) and the reaper's heartbeat
    # lapse (10 s) that a killed worker's jobs wait for. Generous for a busy 2-core machine.
    assert exited_after_s < 8, exited_after_s
