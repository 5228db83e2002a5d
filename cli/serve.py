"""`ragq serve`: Redis (embedded unless REDIS_URL is set), N workers and the API as child processes.

The children are started as programs (`python -m worker`, `python -m api`), never imported: this process holds no
model and never imports torch or transformers; even the check that the model can be had runs in a child
(`python -m worker.model_check`). Whether a hub model is cached, and whether the hub answers, is found out first
(`cli/model_cache.py`), so an unreachable hub costs no retries. Each child runs in its own process group, so
stopping it also stops what it started (Celery's pool, gunicorn's workers); on Ctrl-C or SIGTERM every group is
stopped and waited for, leaving nothing behind.

What the children print (Celery's banner, gunicorn, task logs) goes to one file per child under
`RAGQ_DATA_DIR/logs` (to the terminal with `--verbose`); the terminal gets a few lines saying what runs where.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import urlsplit

import redis
import requests

from cli.model_cache import CacheState, cache_dir, check_cache, hub_repo_id
from cli.processes import child_env, signal_group, stop_groups
from cli.redis_server import EmbeddedRedis, start_redis
from shared.api_keys import UNAUTHENTICATED_NOTICE, check_exposure, key_ring
from shared.config import Settings
from shared.errors import ConfigError
from shared.models import ModelSpec
from shared.store import connect, ready_workers

READY_POLL_S = 0.2
# Importing transformers alone takes seconds; reading a config from the hub cache or disk adds little.
MODEL_CHECK_TIMEOUT_S = 120
# A child that dies this often within the window is not started again: something is wrong beyond one crash.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60
# Lines of a dead child's log shown in the terminal: enough for a traceback's end.
LOG_TAIL_LINES = 15


class Supervisor:
    """Starts, watches and stops the processes of a single-machine deployment."""

    def __init__(self, settings: Settings, workers: int, verbose: bool = False) -> None:
        self.settings = settings
        self.workers = workers
        # Children's output: the terminal (verbose) or one append-only file per child here.
        self.verbose = verbose
        self.log_dir = settings.data_dir / "logs"
        self.stand_in = False
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.redis: EmbeddedRedis | None = None
        self.stop_requested = False
        self.restarts: dict[str, list[float]] = {}
        self.ring = key_ring(settings)

    def run(self) -> int:
        """Serve until a signal or a child's death; always stop every child before returning."""
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._serve()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True

    def start(self) -> dict[str, str] | None:
        """Check the settings and the model, start Redis (if embedded) and every child; None if it cannot start."""
        check_exposure(self.settings, self.ring)
        env = self._child_env()
        if env is None:
            return None
        for i in range(self.workers):
            self._spawn(f"worker-{i + 1}", "worker", env)
        self._spawn("api", "api", env)
        return env

    def _serve(self) -> int:
        started_at = time.time()
        env = self.start()
        if env is None:
            return 2
        client = connect(
            env["REDIS_URL"], threads=1, sentinel_master=self.settings.sentinel_master, sentinel_password=self.settings.sentinel_password
        )
        url = f"http://{self.settings.host}:{self.settings.port}"
        self._print_plan(env)
        if not self._wait_until_ready(client, url, started_at):
            return 0 if self.stop_requested else 1
        print(f"ragq: serving {url}  dashboard {url}/dashboard  (Ctrl-C stops)", flush=True)
        if not self.ring.enabled:
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
                self._print_log_tail(name)
                return False
            print(
                f"ragq: {name} exited with code {process.returncode}; starting it again{self._log_hint(name)}",
                file=sys.stderr,
                flush=True,
            )
            signal_group(process, signal.SIGKILL)
            self.restarts[name] = [*recent, now]
            self.children[index] = (name, self._start(name, "worker" if name.startswith("worker") else "api", env))
        return True

    def _child_env(self) -> dict[str, str] | None:
        env = child_env(self.settings)
        spec = self.settings.default_model
        problem = self._model_problem(env)
        if problem:
            advice = download_advice(spec.source)
            if not self.settings.fallback_tiny_model:
                print(f"ragq: model {spec.name} ({spec.source}) cannot be loaded: {problem}", file=sys.stderr)
                if advice:
                    print(f"ragq: {advice}", file=sys.stderr)
                return None
            print(f"ragq: model {spec.source} cannot be had here: {problem}")
            if advice:
                print(f"ragq: {advice}")
            print(
                f"ragq: meanwhile serving a tiny random-weight stand-in for {spec.source}, labelled in every answer "
                "(--no-fallback: stop instead)",
                flush=True,
            )
            self.stand_in = True
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

    def _model_problem(self, env: dict[str, str]) -> str | None:
        """Why the default model cannot be had, or None; sets HF_HUB_OFFLINE in `env` when the hub cannot be reached."""
        spec = self.settings.default_model
        # Cache first, then one short request to the hub: no retries, no waiting on a hub that is not there.
        report = check_cache(spec.source, env)
        if report.state is CacheState.UNAVAILABLE:
            return f"it is not in the Hugging Face cache ({cache_dir(env)}) and {report.why_unreachable}"
        if not report.hub_reachable:
            # Cached or local: the children read the cache without asking the hub, hence without its retries.
            env["HF_HUB_OFFLINE"] = "1"
        elif report.state is CacheState.DOWNLOADABLE:
            print(f"ragq: {spec.source} is not cached yet: the workers download it into {cache_dir(env)}", flush=True)
        return check_model_in_child(spec, env)

    def _print_plan(self, env: dict[str, str]) -> None:
        """A few lines: where Redis runs, which model on which device, where the logs go."""
        settings = self.settings
        if self.redis is not None:
            print(f"ragq: Redis embedded on 127.0.0.1:{self.redis.port}, data in {settings.data_dir / 'redis'}")
        else:
            print(f"ragq: Redis at {without_password(env['REDIS_URL'])} (REDIS_URL)")
        device = settings.device + (" (CUDA if the worker finds one, else CPU)" if settings.device == "auto" else "")
        spec = settings.default_model
        model = f"tiny random-weight T5 (in place of {spec.name})" if self.stand_in else f"{spec.name} ({spec.source})"
        print(f"ragq: model {model} on device {device}, {self.workers} worker(s) loading it")
        if self.verbose:
            print("ragq: the workers' and the API's logs follow here (--verbose)", flush=True)
        else:
            names = ", ".join(self._log_path(name).name for name, _ in self.children)
            print(f"ragq: logs in {self.log_dir}/ ({names}); --verbose shows them here", flush=True)

    def _log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _log_hint(self, name: str) -> str:
        return "" if self.verbose else f" (log: {self._log_path(name)})"

    def _print_log_tail(self, name: str) -> None:
        """The end of a dead child's log, so that why it died is in the terminal too."""
        if self.verbose:
            return
        try:
            lines = self._log_path(name).read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            return
        print(f"ragq: the end of {self._log_path(name)}:", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
        sys.stderr.flush()

    def _spawn(self, name: str, package: str, env: dict[str, str]) -> None:
        self.children.append((name, self._start(name, package, env)))

    def _start(self, name: str, package: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """`python -m worker` or `python -m api`, leading a process group of its own, its output into its log."""
        command = [sys.executable, "-m", package]
        if self.verbose:
            return subprocess.Popen(command, env=env, start_new_session=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log: IO[bytes]
        # Appended to, across restarts and runs; the child holds its own copy of the descriptor.
        with open(self._log_path(name), "ab") as log:
            log.write(f"--- ragq serve: {name} started {time.strftime('%Y-%m-%d %H:%M:%S %z')} ---\n".encode())
            log.flush()
            return subprocess.Popen(command, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

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
                self._print_log_tail(dead.split()[0])
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

    def stop(self) -> None:
        """Stop every child's process group (SIGTERM, wait, SIGKILL what is left); Redis last."""
        stop_groups(process for _, process in self.children)
        self.children.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def check_model_in_child(spec: ModelSpec, env: dict[str, str]) -> str | None:
    """Why `spec`'s model cannot be had, or None, asked of `python -m worker.model_check` (transformers stays there)."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "worker.model_check", spec.source],
            env=env,
            capture_output=True,
            text=True,
            timeout=MODEL_CHECK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return f"the model check did not finish within {MODEL_CHECK_TIMEOUT_S} s"
    if result.returncode == 0:
        return None
    # Exit 1 is an answer (the problem, on stdout); anything else is the check itself failing.
    output = result.stdout if result.returncode == 1 else result.stderr
    lines = output.strip().splitlines()
    return lines[-1] if lines else f"the model check exited with code {result.returncode}"


def download_advice(source: str) -> str:
    """What to do about a hub model that is not cached here, or '' for a local or simulated one."""
    repo_id = hub_repo_id(source)
    if repo_id is None:
        return ""
    return (
        f"to serve it: `hf download {repo_id}` where the hub can be reached, into this cache (or copy the cache "
        "here); or set RAGQ_MODEL to a local directory"
    )


def without_password(url: str) -> str:
    """`url` with any password left out, fit for a terminal or a log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()
