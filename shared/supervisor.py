"""`ragq serve`: Redis (embedded unless REDIS_URL is set), N workers and the API as child processes.

Each child runs in its own process group, so stopping it also stops what it started (Celery's pool
processes); on Ctrl-C or SIGTERM every group is stopped and waited for, leaving nothing behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

import redis
import requests

from shared.config import Settings
from shared.errors import ConfigError
from shared.api_keys import UNAUTHENTICATED_NOTICE, check_exposure, key_ring
from shared.redis_server import EmbeddedRedis, start_redis
from shared.store import ready_workers

STOP_GRACE_S = 30
READY_POLL_S = 0.2
# A child that dies this often within the window is not started again: something is wrong beyond one crash.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60


class Supervisor:
    """Starts, watches and stops the processes of a single-machine deployment."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.redis: EmbeddedRedis | None = None
        self.stop_requested = False
        self.restarts: dict[str, list[float]] = {}

    def run(self) -> int:
        """Serve until a signal or a child's death; always stop every child before returning."""
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._serve()
        finally:
            self._stop_children()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True

    def _serve(self) -> int:
        ring = key_ring(self.settings)
        check_exposure(self.settings, ring)
        env = self._child_env()
        if env is None:
            return 2
        started_at = time.time()
        for i in range(self.workers):
            self._spawn(f"worker-{i + 1}", ["worker"], env)
        self._spawn("api", ["api"], env)
        client = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True, socket_connect_timeout=2)
        url = f"http://{self.settings.host}:{self.settings.port}"
        if not self._wait_until_ready(client, url, started_at):
            return 0 if self.stop_requested else 1
        print(
            f"ragq: serving {url}  ({self.workers} worker(s) for {self.settings.default_model.name}; "
            f"Redis {'embedded' if self.redis else 'from REDIS_URL'}; Ctrl-C stops)",
            flush=True,
        )
        if not ring.enabled:
            print(f"ragq: {UNAUTHENTICATED_NOTICE}", flush=True)
        while not self.stop_requested:
            if not self._restart_dead_children(env):
                return 1
            time.sleep(READY_POLL_S)
        return 0

    def _restart_dead_children(self, env: dict[str, str]) -> bool:
        """Start again any child that died (a killed worker's jobs are re-run by the others); False to give up."""
        for index, (name, process) in enumerate(self.children):
            if process.poll() is None:
                continue
            now = time.monotonic()
            recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_WINDOW_S]
            if process.returncode == 2 or len(recent) >= MAX_RESTARTS:
                # Exit code 2 is a configuration or model error: starting again would fail the same way.
                print(f"ragq: {name} exited with code {process.returncode}; stopping", file=sys.stderr, flush=True)
                return False
            print(f"ragq: {name} exited with code {process.returncode}; starting it again", file=sys.stderr, flush=True)
            _signal_group(process, signal.SIGKILL)
            self.restarts[name] = [*recent, now]
            self.children[index] = (name, self._start(["worker"] if name.startswith("worker") else ["api"], env))
        return True

    def _child_env(self) -> dict[str, str] | None:
        from worker.model_check import check_model

        env = {k: v for k, v in os.environ.items() if not k.startswith("RAGQ_")}
        env.update(self.settings.to_env())
        spec = self.settings.default_model
        problem = check_model(spec)
        if problem:
            if not self.settings.fallback_tiny_model:
                print(f"ragq: model {spec.name} ({spec.source}) cannot be loaded: {problem}", file=sys.stderr)
                return None
            print(
                f"ragq: model {spec.source} cannot be had here (offline and not cached?); "
                "serving a tiny random-weight stand-in, labelled in every answer",
                flush=True,
            )
            # The hub is unreachable: spare each worker the wait for it.
            env["HF_HUB_OFFLINE"] = "1"
        if self.settings.redis_url is None:
            try:
                self.redis = start_redis(self.settings.data_dir / "redis")
            except ConfigError as exc:
                print(f"ragq: {exc.message}", file=sys.stderr)
                return None
            env["REDIS_URL"] = self.redis.url
        else:
            env["REDIS_URL"] = self.settings.redis_url
        return env

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.children.append((name, self._start(command, env)))

    @staticmethod
    def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "shared.cli", *command], env=env, start_new_session=True)

    def _dead_child(self) -> str | None:
        for name, process in self.children:
            if process.poll() is not None:
                return f"{name} (exit code {process.returncode})"
        return None

    def _wait_until_ready(self, client: redis.Redis, url: str, started_at: float) -> bool:
        """Wait until the API answers /readyz and every worker has loaded its model."""
        deadline = time.monotonic() + self.settings.model_load_timeout_s
        while not self.stop_requested:
            dead = self._dead_child()
            if dead:
                print(f"ragq: {dead} stopped during start-up", file=sys.stderr, flush=True)
                return False
            if time.monotonic() > deadline:
                print("ragq: workers did not become ready in time", file=sys.stderr, flush=True)
                return False
            try:
                workers_ready = ready_workers(client, started_at) >= self.workers
            except redis.exceptions.RedisError:
                workers_ready = False
            if workers_ready and self._api_ready(url):
                return True
            time.sleep(READY_POLL_S)
        return False

    @staticmethod
    def _api_ready(url: str) -> bool:
        try:
            return requests.get(f"{url}/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def _stop_children(self) -> None:
        """SIGTERM every child's process group, wait, then SIGKILL what is left; Redis last."""
        for _, process in self.children:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for _, process in self.children:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _, process in self.children:
            # Also reaps pool processes whose parent has already exited.
            _signal_group(process, signal.SIGKILL)
            process.wait()
        if self.redis is not None:
            self.redis.stop()


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
