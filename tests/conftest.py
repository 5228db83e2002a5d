"""Fixtures: one real redis-server per session (flushed per test), tiny real models, real workers."""

from __future__ import annotations

import re

import os

# Without this a Hugging Face hub lookup hangs for about 50 s on a machine without internet.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import redis  # noqa: E402
from flask import Flask  # noqa: E402
from flask.testing import FlaskClient  # noqa: E402

from api import create_app  # noqa: E402
from cli.redis_server import EmbeddedRedis, start_redis  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.models import ModelSpec  # noqa: E402
from shared.store import JobStore, connect  # noqa: E402
from tests.helpers import WorkerProcess, start_worker  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = start_redis(tmp_path_factory.mktemp("redis"), appendonly=False)
    yield server
    server.stop()


# Kept when a test empties Redis: the session's workers' heartbeats. Without its heartbeat a worker looks dead
# for up to a heartbeat interval, and another worker's reaper sends its jobs again (a job then counts two claims).
# Their registry entries stay too, so that a test reading `/v1/models` finds them at once.
_WORKER_KEYS = re.compile(r"ragq:worker:.+:(alive|info)|ragq:workers:live")


def empty_redis(client: redis.Redis) -> None:
    """Delete every key but the session's workers' heartbeats (`tests.helpers.data_keys` leaves them out too)."""
    doomed = [key for key in client.scan_iter(count=1000) if not _WORKER_KEYS.fullmatch(key)]
    for start in range(0, len(doomed), 1000):
        client.delete(*doomed[start : start + 1000])


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = connect(redis_server.url)
    empty_redis(client)
    yield client
    empty_redis(client)
    client.close()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny T5 and a tiny Phi-3, saved with save_pretrained once per run."""
    from worker.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {shape: build_tiny_model(root / f"tiny-{shape}", shape) for shape in ("t5", "phi3")}


@pytest.fixture(scope="session")
def settings(redis_server: EmbeddedRedis, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        redis_url=redis_server.url,
        default_model=ModelSpec("tiny-t5", str(tiny_models["t5"])),
        extra_models=(
            ModelSpec("tiny-phi3", str(tiny_models["phi3"])),
            ModelSpec("unserved", "nowhere/none"),
            # Served only by workers a test starts and kills itself.
            ModelSpec("tiny-t5-chaos", str(tiny_models["t5"])),
        ),
        data_dir=tmp_path_factory.mktemp("data"),
        task_time_limit_s=60,
        visibility_timeout_s=120,
        callback_secret="test-callback-secret",
        # The tests' callback receivers listen on loopback.
        callback_allow_private=True,
    )


@pytest.fixture
def store(redis_client: redis.Redis, settings: Settings) -> JobStore:
    return JobStore(redis_client, settings.result_ttl_s)


@pytest.fixture
def app(settings: Settings, redis_client: redis.Redis) -> Flask:
    return create_app(settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "documents.json").exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def t5_worker(settings: Settings, redis_server: EmbeddedRedis) -> Iterator[WorkerProcess]:
    """One worker for the whole run: starting one costs seconds. Tests flushing Redis do not disturb it."""
    worker = start_worker(settings, "tiny-t5", connect(redis_server.url))
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def phi3_worker(settings: Settings, redis_server: EmbeddedRedis) -> Iterator[WorkerProcess]:
    worker = start_worker(settings, "tiny-phi3", connect(redis_server.url))
    yield worker
    worker.stop()


# The session's worker processes: a test using one is end to end, so `slow`.
WORKER_FIXTURES = frozenset({"t5_worker", "phi3_worker"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a worker process `slow` (the others that start processes say so themselves)."""
    for item in items:
        if WORKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
