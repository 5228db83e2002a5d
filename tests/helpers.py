"""Running real processes from tests: a Celery worker subprocess, process-tree inspection."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import redis
import requests

from cli import processes
from cli.redis_server import free_port
from shared.config import Settings
from shared.store import ready_workers

WORKER_START_TIMEOUT_S = 120


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM the worker's process group (pool processes included), wait, SIGKILL what is left."""
        processes.stop_groups([self.process])

    def drain(self, timeout_s: float = 60) -> tuple[float, float]:
        """SIGTERM the worker's main process alone (Celery's warm shutdown) and wait for it to exit cleanly;
        when the signal went (epoch seconds) and how long the exit took."""
        sigterm_at = time.time()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout_s)
        assert self.process.returncode == 0, self.log()[-3000:]
        return sigterm_at, time.time() - sigterm_at


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a child that runs on `settings`, offline."""
    return processes.child_env(settings, HF_HUB_OFFLINE="1", **extra)


def start_worker(settings: Settings, model: str, client: redis.Redis) -> WorkerProcess:
    """`python -m worker --model MODEL` as a subprocess; returns once it has loaded the model and consumes."""
    log_path = settings.data_dir / f"worker-{model}-{time.time_ns()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started_at = time.time()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "--model", model, "--loglevel", "INFO"],
            env=child_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = WorkerProcess(process, log_path)
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}:\n{worker.log()}")
        # The pool process has loaded the model, and the main process consumes.
        if ready_workers(client, started_at, model) and "ready." in worker.log():
            return worker
        time.sleep(0.1)
    worker.stop()
    raise RuntimeError(f"worker did not become ready:\n{worker.log()}")


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                found.add(child)
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# Keys written whatever a test does: per-minute request counters (every `/v1` request), the heartbeats and
# registry entries of the session's workers, the activity counters their registries write every 2 s (so
# possibly for jobs of an earlier test), the reapers' turn locks, and Kombu's stash of unacknowledged messages
# (it comes and goes as a live worker takes and acks messages, whatever the test is looking at). The formats are pinned by
# tests/test_redis_keys.py and tests/test_models_api.py.
_NOISE_KEYS = re.compile(
    r"ragq:tenant:.+:rate:\d+|ragq:worker:.+:(alive|info)|ragq:workers:live"
    r"|ragq:(model|batch):.+:finished:\d+|ragq:tenant:.+:failures:.+"
    r"|unacked|unacked_index|unacked_mutex|ragq:reaper:(turn|overdue-turn)"
)


def data_keys(client: redis.Redis) -> set[str]:
    """Every key in Redis but request counters and worker heartbeats."""
    return {key for key in client.keys("*") if not _NOISE_KEYS.fullmatch(key)}


class TlsProxy:
    """A TLS front for a plain-TCP Redis on loopback: lets tests use `rediss://` with any redis-server build."""

    def __init__(self, certificate: Path, key: Path, target_port: int) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certificate, key)
        self.target_port = target_port
        self.handshakes = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.handshakes += 1
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)

    def close(self) -> None:
        self.server.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def self_signed_certificate(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate for `host` (an IP address or a DNS name) and its key, made with `cryptography`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        alternative: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alternative = x509.DNSName(host)
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{host}.crt", directory / f"{host}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class Receiver:
    """A callback receiver on loopback: records each request's headers and body; fails its first `failures` with 500."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                self.send_response(500 if len(receiver.requests) <= receiver.failures else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = HTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


def wait_for_api(url: str, process: subprocess.Popen[Any], timeout_s: float, log_path: Path | None = None) -> None:
    """Return once the API at `url` answers `/healthz`; RuntimeError (with its log, if any) if it exits or is late."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            requests.get(f"{url}/healthz", timeout=1)
            return
        except requests.RequestException:
            if process.poll() is not None or time.monotonic() > deadline:
                log = log_path.read_text(errors="replace") if log_path is not None else "(no log)"
                raise RuntimeError(f"the API did not start:\n{log}") from None
            time.sleep(0.2)
