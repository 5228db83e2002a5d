"""Pieces every benchmark uses: the stack it runs against (Redis, the API, workers), printing and saving figures.

Children are stopped through `cli.processes`, the same code `ragq serve` and the tests use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
import requests

from cli import processes
from cli.redis_server import EmbeddedRedis, free_port, start_redis
from shared.store import connect, ready_workers

API_START_TIMEOUT_S = 60
WORKER_START_TIMEOUT_S = 180
# A worker announces itself just before it starts consuming: give it that moment before measuring.
WORKER_SETTLE_S = 1.0

def _ticks_per_s() -> int:
    return int(os.sysconf("SC_CLK_TCK"))


def _process_table() -> dict[int, list[str]]:
    """The fields after the command name of /proc/PID/stat, for every live process."""
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # Fields after the command name, which may itself hold spaces and parentheses.
                stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
    return stats


def _tree(pid: int, stats: dict[int, list[str]]) -> set[int]:
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, fields in stats.items() if int(fields[1]) == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return tree


def _cpu_s(pids: set[int], stats: dict[int, list[str]]) -> float:
    # utime and stime are fields 14 and 15 of /proc/PID/stat, the 12th and 13th after the command name.
    return sum(int(stats[p][11]) + int(stats[p][12]) for p in pids if p in stats) / _ticks_per_s()


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and its live descendants so far, from /proc (0 for a finished one)."""
    stats = _process_table()
    return _cpu_s(_tree(pid, stats), stats)


def worker_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds of a worker process and of its engine process (spawned by multiprocessing, with descendants)."""
    stats = _process_table()
    tree = _tree(pid, stats)
    engine: set[int] = set()
    for child in tree - {pid}:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                engine |= _tree(child, stats)
        except OSError:
            continue
    return _cpu_s(tree - engine, stats), _cpu_s(engine, stats)


def device_busy_s(stats_file: Path, start: float, end: float) -> float:
    """Simulated device seconds inside the wall-clock window [start, end], from the device's call lines
    (`stats_file` of `worker/simulated.py`)."""
    busy = 0.0
    for line in stats_file.read_text().splitlines() if stats_file.exists() else []:
        call = json.loads(line)
        overlap = min(end, call["end"]) - max(start, call["start"])
        if overlap > 0:
            # A call's device time is spread over its wall time: count the share inside the window.
            busy += call["device_s"] * min(1.0, overlap / max(call["end"] - call["start"], 1e-9))
    return busy


def run_batch(url: str, lines: list[dict[str, Any]], poll_s: float = 0.1) -> list[dict[str, Any]]:
    """Submit `lines` as one batch, wait until it ends, return its results in input order."""
    body = "\n".join(json.dumps(line) for line in lines).encode()
    response = requests.post(f"{url}/v1/batches", data=body, headers={"Content-Type": "application/x-ndjson"}, timeout=600)
    response.raise_for_status()
    batch_id = response.json()["id"]
    while requests.get(f"{url}/v1/batches/{batch_id}", timeout=60).json()["status"] in ("in_progress", "cancelling"):
        time.sleep(poll_s)
    results = requests.get(f"{url}/v1/batches/{batch_id}/results", timeout=600)
    results.raise_for_status()
    return [json.loads(line) for line in results.content.splitlines()]


def child_env(**settings: str) -> dict[str, str]:
    """This process's environment without ragq settings of its own, offline, plus `settings` for the children."""
    return processes.child_env(HF_HUB_OFFLINE="1", **settings)


def report(figures: dict[str, Any], json_path: Path | None) -> None:
    """Print the figures as an aligned table and, with a path, write them as JSON."""
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(figures, indent=2))


class Stack:
    """An embedded Redis (AOF on) and `python -m api` / `python -m worker` children, logs under `work`.

    `settings` are RAGQ_* variables for every child, on top of the Redis URL, the API port and a data folder.
    """

    def __init__(self, work: Path, **settings: str) -> None:
        self.work = work
        self.redis: EmbeddedRedis = start_redis(work / "redis", appendonly=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = child_env(
            REDIS_URL=self.redis.url, RAGQ_PORT=str(self.port), RAGQ_DATA_DIR=str(work / "data"), **settings
        )
        self.children: list[subprocess.Popen[bytes]] = []
        self.workers_started = 0

    def client(self) -> redis.Redis:
        """A Redis client on the stack's Redis (strings decoded)."""
        return connect(self.redis.url)

    def spawn(
        self, package: str, *args: str, log: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `python -m PACKAGE ARGS` in a process group of its own, its output appended to WORK/LOG.log."""
        if log is None:
            log = package if package != "worker" else f"worker-{self.workers_started}"
        if package == "worker":
            self.workers_started += 1
        with (self.work / f"{log}.log").open("ab") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", package, *args],
                env=self.env if env is None else env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children.append(child)
        return child

    def api_ready(self) -> bool:
        """Whether the API answers /readyz."""
        try:
            return requests.get(f"{self.url}/readyz", timeout=2).ok
        except requests.RequestException:
            return False

    def start_api(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """`python -m api ARGS`; returns once /readyz answers."""
        api = self.spawn("api", *args, env=env)
        deadline = time.monotonic() + API_START_TIMEOUT_S
        while not self.api_ready():
            if time.monotonic() > deadline or api.poll() is not None:
                self.stop([api])
                raise RuntimeError(f"the API did not start; see {self.work / 'api.log'}")
            time.sleep(0.2)
        return api

    def start_workers(
        self, count: int = 1, *args: str, env: dict[str, str] | None = None, timeout_s: float = WORKER_START_TIMEOUT_S
    ) -> list[subprocess.Popen[bytes]]:
        """`count` × `python -m worker ARGS`; returns once each has loaded its model and announced itself."""
        since = time.time()
        workers = [self.spawn("worker", *args, env=env) for _ in range(count)]
        client = self.client()
        deadline = time.monotonic() + timeout_s
        while ready_workers(client, since) < count:
            if time.monotonic() > deadline or any(worker.poll() is not None for worker in workers):
                raise RuntimeError(f"the workers did not start; see the worker logs in {self.work}")
            time.sleep(0.2)
        time.sleep(WORKER_SETTLE_S)
        return workers

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of the API, of the workers, of their engine processes and of Redis (each process with
        its descendants)."""
        used = {"api": 0.0, "worker": 0.0, "engine": 0.0, "redis": process_tree_cpu_s(self.redis.process.pid)}
        for child in self.children:
            # Children run `python -m PACKAGE ...`.
            package = str(list(child.args)[2])  # type: ignore[arg-type]
            if package == "worker":
                worker_s, engine_s = worker_cpu_s(child.pid)
                used["worker"] += worker_s
                used["engine"] += engine_s
            elif package in used:
                used[package] += process_tree_cpu_s(child.pid)
        return used

    def stop(self, children: list[subprocess.Popen[bytes]]) -> None:
        """Stop these children's process groups."""
        processes.stop_groups(children)
        self.children = [child for child in self.children if child not in children]

    def close(self) -> None:
        """Stop every child, then Redis."""
        self.stop(list(self.children))
        self.redis.stop()
