"""`ragq serve`'s parent process: it starts workers and the API as programs and never imports torch itself."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from cli.processes import child_env
from cli.redis_server import free_port
from cli.serve import check_model_in_child, without_password
from shared.models import ModelSpec

# Starts the supervisor's children and a model check in a child process.
pytestmark = pytest.mark.slow

SERVE_START_TIMEOUT_S = 240
ROOT = Path(__file__).resolve().parents[1]

# Runs the supervisor's start-up (settings, the model check, embedded Redis, spawning every child), stops it again,
# and reports what this process imported meanwhile.
START_UP = """
import dataclasses, json, sys
from cli.serve import Supervisor
from shared.config import Settings

supervisor = Supervisor(dataclasses.replace(Settings.from_env(), fallback_tiny_model=True), workers=2)
try:
    env = supervisor.start()
    children = [name for name, _ in supervisor.children]
finally:
    supervisor.stop()
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "worker", "api"})
print(json.dumps({"started": env is not None, "children": children, "loaded": loaded}))
"""


def test_serve_start_up_imports_neither_torch_nor_transformers(tmp_path: Path) -> None:
    env = child_env(
        HF_HUB_OFFLINE="1",
        RAGQ_MODEL=str(tmp_path / "no-model"),
        RAGQ_DATA_DIR=str(tmp_path / "data"),
        RAGQ_PORT=str(free_port()),
    )
    result = subprocess.run([sys.executable, "-c", START_UP], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    *notices, last = result.stdout.strip().splitlines()
    report = json.loads(last)
    # The model check ran (in a child) and found the model missing, so the stand-in is announced.
    assert any("stand-in" in line for line in notices), result.stdout
    assert report == {"started": True, "children": ["worker-1", "worker-2", "api"], "loaded": []}


def test_the_model_check_in_a_child_says_what_the_check_in_process_says(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    from worker.model_check import check_model

    env = child_env(HF_HUB_OFFLINE="1")
    missing = ModelSpec("missing", str(tmp_path / "no-model"))
    problem = check_model_in_child(missing, env)
    assert problem and problem == check_model(missing)
    assert check_model_in_child(ModelSpec("tiny", str(tiny_models["t5"])), env) is None


def serve_process(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.Popen[str], int]:
    """`ragq serve ARGS` in `tmp_path` with defaults only (embedded Redis, default model), its output piped."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(port), *args],
        # Run from a scratch directory (relative paths land there), on this checkout's code.
        env=child_env(RAGQ_DATA_DIR="data", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT), **env),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, port


def read_until(process: subprocess.Popen[str], text: str, timeout_s: float) -> list[str]:
    """Lines `process` prints up to the first holding `text`; fails if it exits or the time runs out first."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if text in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout_s), "\n".join(lines)
    return lines


# The hub client's own retry schedule for an unreachable hub is 1+2+4+8+8 s: well past this.
NO_RETRIES_S = 15


@pytest.mark.parametrize(
    "hub", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:1"}], ids=["offline", "unreachable"]
)
def test_serve_says_at_once_that_an_uncached_model_cannot_be_had(tmp_path: Path, hub: dict[str, str]) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "cli", "serve", "--no-fallback", "--port", str(free_port())],
        env=child_env(RAGQ_DATA_DIR=str(tmp_path / "data"), HF_HOME=str(tmp_path / "hf"), **hub),
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed_s = time.monotonic() - started
    assert result.returncode == 2, result.stdout + result.stderr
    assert "google/flan-t5-base" in result.stderr and "not in the Hugging Face cache" in result.stderr
    assert "hf download google/flan-t5-base" in result.stderr and "RAGQ_MODEL" in result.stderr
    assert "Retry" not in result.stdout + result.stderr
    assert elapsed_s < NO_RETRIES_S
    # Nothing was started: no worker, no log files.
    assert not (tmp_path / "data" / "logs").exists()


def test_serve_prints_a_few_lines_and_keeps_the_childrens_logs_in_files(tmp_path: Path) -> None:
    process, port = serve_process(tmp_path, HF_HUB_OFFLINE="1")
    url = f"http://127.0.0.1:{port}"
    try:
        lines = read_until(process, "ragq: serving", SERVE_START_TIMEOUT_S)
        job = requests.post(f"{url}/v1/jobs", json={"question": "How do I add workers?"}, timeout=10).json()
        finished = requests.get(f"{url}/v1/jobs/{job['id']}?wait=60", timeout=90).json()
        assert finished["status"] == "succeeded", finished
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=90)
    assert process.returncode == 0
    output = "\n".join(lines)
    assert len(lines) <= 8, output
    assert "ragq: Redis embedded on 127.0.0.1:" in output
    assert "ragq: model tiny random-weight T5 (in place of flan-t5-base) on device auto" in output
    # The stand-in is announced once, with the model it stands in for.
    notice = (
        "ragq: meanwhile serving a tiny random-weight stand-in for google/flan-t5-base, labelled in every answer "
        "(--no-fallback: stop instead)"
    )
    assert [line for line in lines if "stand-in" in line] == [notice]
    logs = tmp_path / "data" / "logs"
    assert f"ragq: logs in {Path('data') / 'logs'}/ (worker-1.log, api.log)" in output
    assert lines[-1].startswith(f"ragq: serving {url}  dashboard {url}/dashboard")
    # The children's own output is in their files, not in the terminal.
    for noise in ("celery@", "[tasks]", "gunicorn", "INFO", "Retry"):
        assert noise not in output + rest, noise
    worker_log = (logs / "worker-1.log").read_text()
    assert "[tasks]" in worker_log and "ragq.answer" in worker_log and "ready." in worker_log
    # Celery's own task log (its task id is not the job id), which the terminal no longer shows.
    assert re.search(r"Task ragq\.answer\[[0-9a-f-]+\] succeeded", worker_log)
    assert "Starting gunicorn" in (logs / "api.log").read_text()


def test_serve_verbose_shows_the_childrens_logs_in_the_terminal(tmp_path: Path) -> None:
    process, _ = serve_process(tmp_path, "--verbose", HF_HUB_OFFLINE="1")
    try:
        lines = read_until(process, "Starting gunicorn", SERVE_START_TIMEOUT_S)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=90)
    assert any("--verbose" in line for line in lines)
    assert not (tmp_path / "data" / "logs").exists()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        ("rediss://app:s3cret@redis.example.com:6380/1", "rediss://app:***@redis.example.com:6380/1"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_serve_shows_redis_urls_without_their_password(url: str, shown: str) -> None:
    assert without_password(url) == shown


def test_serve_shows_the_end_of_a_childs_log_when_it_dies(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    # A config without weights passes the model check; the worker then fails to load the model and exits 2.
    model = tmp_path / "no-weights"
    model.mkdir()
    shutil.copy(tiny_models["t5"] / "config.json", model / "config.json")
    result = subprocess.run(
        [sys.executable, "-m", "cli", "serve", "--no-fallback", "--port", str(free_port())],
        env=child_env(RAGQ_MODEL=str(model), RAGQ_DATA_DIR="data", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SERVE_START_TIMEOUT_S,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ragq: worker-1 (exit code 2) stopped during start-up" in result.stderr
    log = tmp_path / "data" / "logs" / "worker-1.log"
    assert f"ragq: the end of {Path('data') / 'logs' / 'worker-1.log'}:" in result.stderr
    # The worker's own last words, from its log file, are in the terminal too.
    last = log.read_text().strip().splitlines()[-1]
    assert "could not be loaded" in last and f"  {last}" in result.stderr.splitlines()
