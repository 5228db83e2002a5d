"""The `ragq` command as a user runs it: serve, ask, SIGTERM, configuration errors."""

from __future__ import annotations

import csv
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.processes import child_env
from cli.redis_server import free_port
from tests.helpers import alive, descendants

# Each test runs `ragq serve` or another `ragq` process: seconds each.
pytestmark = pytest.mark.slow

SERVE_START_TIMEOUT_S = 240


def clean_env(**extra: str) -> dict[str, str]:
    return child_env(HF_HUB_OFFLINE="1", **extra)


def ragq(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )


class Serve:
    """`ragq serve` in the background, its output collected line by line."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        # Defaults only: embedded Redis, built-in corpus, default model (not to be had offline).
        env = clean_env(RAGQ_PORT=str(self.port), RAGQ_DATA_DIR=str(tmp_path / "data"))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout_s: float) -> None:
        while True:
            try:
                line = self.lines.get(timeout=timeout_s)
            except queue.Empty:
                raise AssertionError(f"{text!r} not printed; output:\n{''.join(self.output)}") from None
            self.output.append(line)
            if text in line:
                return


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    server = Serve(tmp_path_factory.mktemp("serve"))
    try:
        server.wait_for("ragq: serving", SERVE_START_TIMEOUT_S)
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()


def test_serve_says_once_that_it_uses_a_stand_in_model(serve: Serve) -> None:
    notices = [line for line in serve.output if "stand-in" in line]
    assert len(notices) == 1
    assert "google/flan-t5-base" in notices[0]
    assert f"serving {serve.url}" in serve.output[-1]


def test_the_serve_parent_never_loads_torch(serve: Serve) -> None:
    # The supervisor starts the workers as programs; torch lives in them only, not in the process watching them.
    maps = Path(f"/proc/{serve.process.pid}/maps").read_text()
    assert "libtorch" not in maps and "/torch/" not in maps


def test_ask_prints_answer_sources_and_stand_in_label(serve: Serve) -> None:
    result = ragq("ask", "How do I add more workers?", "--course", "ragq", "--url", serve.url)
    assert result.returncode == 0, result.stderr
    assert "Sources:" in result.stdout
    assert "1. [" in result.stdout and "/ Scaling /" in result.stdout
    assert "stand-in for google/flan-t5-base" in result.stdout


def test_ask_with_invalid_request_exits_non_zero_with_the_error(serve: Serve) -> None:
    result = ragq("ask", "question", "--top-k", "50", "--url", serve.url)
    assert result.returncode == 2
    assert "HTTP 422" in result.stderr and "top_k" in result.stderr


def test_batch_submit_waits_and_a_second_run_does_not_submit_twice(serve: Serve, tmp_path: Path) -> None:
    path = tmp_path / "night.jsonl"
    lines = [{"custom_id": f"c{i}", "question": q, "params": {"max_new_tokens": 4}} for i, q in enumerate(["How do I stop ragq?", "What is a batch?", "How do I scale?"])]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    first = ragq("batch", "submit", str(path), "--wait", "--url", serve.url)
    assert first.returncode == 0, first.stderr
    batch_id = first.stdout.strip()
    assert batch_id.startswith("batch_")
    again = ragq("batch", "submit", str(path), "--url", serve.url)
    assert again.returncode == 0 and again.stdout.strip() == batch_id
    assert "already submitted" in again.stderr

    status = ragq("batch", "status", batch_id, "--json", "--url", serve.url)
    assert json.loads(status.stdout)["request_counts"]["succeeded"] == 3
    out = tmp_path / "results.jsonl"
    assert ragq("batch", "results", batch_id, "-o", str(out), "--url", serve.url).returncode == 0
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == ["c0", "c1", "c2"]
    listing = ragq("batch", "list", "--url", serve.url)
    assert batch_id in listing.stdout
    ended = ragq("batch", "cancel", batch_id, "--url", serve.url)
    assert ended.returncode == 2 and "409" in ended.stderr


def test_eval_reports_hit_rate_and_mrr(serve: Serve, tmp_path: Path) -> None:
    from worker.corpus import load_documents

    docs = load_documents(None, tmp_path)[:4]
    path = tmp_path / "eval.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "course", "document"])
        for doc in docs:
            writer.writerow([doc["question"], doc["course"], doc["id"]])
    result = ragq("eval", str(path), "--json", "--url", serve.url, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    # The questions are the FAQ's own: each one's entry must be among its sources.
    assert figures["n"] == 4 and figures["failed"] == 0
    assert figures["hit_rate"] == 1.0 and 0.5 <= figures["mrr"] <= 1.0


def test_serve_restarts_a_killed_worker(serve: Serve) -> None:
    [worker] = [
        pid for pid in descendants(serve.process.pid) if b"-m worker " in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    ]
    os.killpg(worker, signal.SIGKILL)
    serve.wait_for("starting it again", 30)
    result = ragq("ask", "Is the worker back?", "--url", serve.url, timeout=240)
    assert result.returncode == 0, result.stderr
    assert serve.process.poll() is None


def test_sigterm_stops_every_process_serve_started(serve: Serve) -> None:
    tree = descendants(serve.process.pid)
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ") for pid in tree]
    assert any(b"redis-server" in c for c in commands)
    assert any(b"-m worker " in c for c in commands)
    assert any(b"-m api " in c for c in commands)
    assert len(tree) >= 4  # redis, worker, api + its gunicorn worker
    serve.process.send_signal(signal.SIGTERM)
    assert serve.process.wait(90) == 0
    assert [pid for pid in tree if alive(pid)] == []


def test_ask_without_a_server_exits_non_zero() -> None:
    result = ragq("ask", "anything", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "cannot reach" in result.stderr


def test_unknown_setting_stops_start_up_with_one_line() -> None:
    result = ragq("serve", env=clean_env(RAGQ_WORKRES="2"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "RAGQ_WORKRES" in result.stderr


def test_worker_for_a_missing_model_stops_with_one_line(tmp_path: Path) -> None:
    result = ragq(
        "worker", env=clean_env(RAGQ_MODEL=str(tmp_path / "no-model"), RAGQ_DATA_DIR=str(tmp_path), REDIS_URL="redis://127.0.0.1:1/0")
    )
    assert result.returncode == 2
    assert "cannot be loaded" in result.stderr
    assert result.stderr.strip().count("\n") == 0
