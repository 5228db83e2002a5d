"""`python -m bench.load`: the API under load on loopback: submit, long-poll and read latency, and 429s exactly where
quotas say.

Starts an embedded Redis, the API under gunicorn with three tenants' keys, and one worker with a tiny local T5
(4 new tokens a job). Phase 1: `--clients` threads, each with its own keep-alive session, for `--seconds`:
submit a job, long-poll it (`?wait=30`) until it is finished, read it once more; reports requests/s, p50/p99
of submit and of the plain read, and how long after a job finished its long-poll answered (p50/p99), plus
every error (5xx or no answer: must be 0). Phase 2: tenant `capped` submits `--quota` + 20 jobs against
`RAGQ_MAX_OUTSTANDING_JOBS=--quota` (for a model no worker serves, so none finishes; exactly 20 must be refused),
and tenant `limited` sends `--rate` + 20 requests within a minute against `RAGQ_RATE_LIMIT_PER_MIN=--rate`
(exactly 20 refused). Phase 3 (the crowd): `--long-polls` raw connections each hold `?wait=60` on a job that
never finishes, and `--half-open` connections send part of a request head and then nothing (re-opened as soon as
the API cuts them, as an attacker would); meanwhile `--probes` fresh connections each GET /healthz and POST a
job, one after another: their p50/p99 must stay under 1 s. Then every job is cancelled and each long-poll must
answer 200 with the cancelled job (none was dropped or answered early). `--json PATH` writes the figures.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from bench.common import Stack, report

KEYS = {
    "load": "load-key-0123456789abcdef",
    "capped": "capped-key-0123456789abcdef",
    "limited": "limited-key-0123456789abcdef",
}
JOB = {"question": "How do I run more workers?", "course": "ragq", "model": "load", "params": {"max_new_tokens": 4, "num_beams": 1}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def headers(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def throughput(url: str, clients: int, seconds: float) -> dict[str, Any]:
    """Each client submits a job, long-polls it until it is finished, reads it again; until time is up."""
    submit_ms: list[float] = []
    read_ms: list[float] = []
    notify_ms: list[float] = []
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        session = requests.Session()
        session.headers.update(headers("load"))
        mine: dict[str, list[float]] = {"submit": [], "read": [], "notify": []}
        mine_statuses: Counter[str] = Counter()
        while time.monotonic() < deadline:
            try:
                t0 = time.perf_counter()
                response = session.post(f"{url}/v1/jobs", json=JOB, timeout=30)
                mine["submit"].append((time.perf_counter() - t0) * 1000)
                mine_statuses[str(response.status_code)] += 1
                if response.status_code != 202:
                    continue
                job = response.json()
                while job["status"] in ("queued", "running"):
                    response = session.get(f"{url}/v1/jobs/{job['id']}", params={"wait": 30}, timeout=60)
                    received = time.time()
                    mine_statuses[str(response.status_code)] += 1
                    job = response.json()
                if job["finished_at"]:
                    finished = datetime.fromisoformat(job["finished_at"]).timestamp()
                    mine["notify"].append(max(0.0, received - finished) * 1000)
                t0 = time.perf_counter()
                response = session.get(f"{url}/v1/jobs/{job['id']}", timeout=30)
                mine["read"].append((time.perf_counter() - t0) * 1000)
                mine_statuses[str(response.status_code)] += 1
            except requests.RequestException as exc:
                mine_statuses[type(exc).__name__] += 1
        with lock:
            submit_ms.extend(mine["submit"])
            read_ms.extend(mine["read"])
            notify_ms.extend(mine["notify"])
            statuses.update(mine_statuses)

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    errors = sum(n for status, n in statuses.items() if not status.isdigit() or int(status) >= 500)
    return {
        "clients": clients,
        "jobs_done": len(notify_ms),
        "requests": sum(statuses.values()),
        "requests_per_s": round(sum(statuses.values()) / elapsed, 1),
        "submit_p50_ms": round(percentile(submit_ms, 0.50), 2),
        "submit_p99_ms": round(percentile(submit_ms, 0.99), 2),
        "read_p50_ms": round(percentile(read_ms, 0.50), 2),
        "read_p99_ms": round(percentile(read_ms, 0.99), 2),
        "long_poll_answer_after_finish_p50_ms": round(percentile(notify_ms, 0.50), 2),
        "long_poll_answer_after_finish_p99_ms": round(percentile(notify_ms, 0.99), 2),
        "errors": errors,
        "statuses": dict(statuses),
    }


def quotas(url: str, quota: int, rate: int) -> dict[str, Any]:
    """429s from the outstanding-jobs quota and from the rate limit, against how many were expected."""
    session = requests.Session()
    session.headers.update(headers("capped"))
    unserved = {**JOB, "model": "unserved"}
    capped: Counter[str] = Counter()
    for _ in range(quota + 20):
        response = session.post(f"{url}/v1/jobs", json=unserved, timeout=30)
        # A 429 of the quota names it; one of the rate limit would not count here.
        over_quota = response.status_code == 429 and "max_outstanding_jobs" in response.json()["error"].get("details", {})
        capped["quota_429" if over_quota else str(response.status_code)] += 1
    limited_session = requests.Session()
    limited_session.headers.update(headers("limited"))
    # Start right after a minute boundary, so all requests fall in one window.
    time.sleep(max(0.0, 60 - time.time() % 60) + 0.05 if time.time() % 60 > 50 else 0)
    limited = Counter(limited_session.get(f"{url}/v1/batches", timeout=30).status_code for _ in range(rate + 20))
    retry_after = limited_session.get(f"{url}/v1/batches", timeout=30).headers.get("Retry-After")
    return {
        "quota_jobs": quota,
        "quota_accepted": capped["202"],
        "quota_429": capped["quota_429"],
        "quota_429_expected": 20,
        "rate_per_min": rate,
        "rate_accepted": limited[200],
        "rate_429": limited[429],
        "rate_429_expected": 20,
        "rate_retry_after_s": retry_after,
    }


def raw_request(method: str, path: str, tenant: str, body: bytes = b"") -> bytes:
    """One HTTP/1.1 request as bytes, for connections this benchmark holds open without a client library."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEYS[tenant]}\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


def open_connection(host: str, port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(data)
    return sock


class HalfOpenCrowd:
    """`count` connections that send half a request head and then nothing; one cut by the API is replaced."""

    PARTIAL = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "

    def __init__(self, host: str, port: int, count: int) -> None:
        self.host, self.port = host, port
        self.selector = selectors.DefaultSelector()
        self.cut = 0
        self.lifetimes_s: list[float] = []
        self.stopping = threading.Event()
        for _ in range(count):
            self._open()
        self.thread = threading.Thread(target=self._replace_cut, daemon=True)
        self.thread.start()

    def _open(self) -> None:
        sock = open_connection(self.host, self.port, self.PARTIAL)
        self.selector.register(sock, selectors.EVENT_READ, time.monotonic())

    def _replace_cut(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.selector.select(timeout=0.2):
                sock = key.fileobj
                self.selector.unregister(sock)
                self.lifetimes_s.append(time.monotonic() - key.data)
                sock.close()  # type: ignore[union-attr]
                self.cut += 1
                if not self.stopping.is_set():
                    self._open()

    def close(self) -> int:
        self.stopping.set()
        self.thread.join()
        open_now = len(self.selector.get_map())
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        return open_now


def read_response(sock: socket.socket, timeout_s: float) -> tuple[int, bytes]:
    """Status and body of one response with Content-Length (enough for this API's JSON answers)."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ")[1]), body


def crowd(url: str, long_polls: int, half_open: int, probes: int, hold_s: float = 10.0) -> dict[str, Any]:
    """/healthz and POST /v1/jobs latency while `long_polls` long-polls wait and `half_open` connections idle."""
    host, port = url.removeprefix("http://").split(":")
    session = requests.Session()
    session.headers.update(headers("load"))
    unserved = {**JOB, "model": "unserved"}
    job_ids = [session.post(f"{url}/v1/jobs", json=unserved, timeout=30).json()["id"] for _ in range(max(1, long_polls // 10))]
    started = time.monotonic()
    waiting = [
        open_connection(host, int(port), raw_request("GET", f"/v1/jobs/{job_ids[i % len(job_ids)]}?wait=60", "load"))
        for i in range(long_polls)
    ]
    attackers = HalfOpenCrowd(host, int(port), half_open)
    opened_s = time.monotonic() - started
    time.sleep(1.0)  # let every long-poll reach its wait
    health_ms: list[float] = []
    submit_ms: list[float] = []
    failures: Counter[str] = Counter()
    # Probe for at least `hold_s`, longer than RAGQ_HEADER_TIMEOUT_S, so the API cuts half-open connections
    # (and the crowd re-opens them) while it is measured.
    probed = 0
    while probed < probes or time.monotonic() - started < hold_s:
        probed += 1
        for name, call, into in (
            ("healthz", lambda: requests.get(f"{url}/healthz", timeout=10), health_ms),
            ("submit", lambda: requests.post(f"{url}/v1/jobs", json=unserved, headers=headers("load"), timeout=10), submit_ms),
        ):
            t0 = time.perf_counter()
            try:
                response = call()
                if response.status_code >= 300:
                    failures[f"{name}_{response.status_code}"] += 1
            except requests.RequestException as exc:
                failures[f"{name}_{type(exc).__name__}"] += 1
            into.append((time.perf_counter() - t0) * 1000)
    measured_s = time.monotonic() - started
    # Cancel every job: each long-poll must now answer with its cancelled job.
    for job_id in job_ids:
        session.delete(f"{url}/v1/jobs/{job_id}", timeout=30)
    answers: Counter[str] = Counter()
    for sock in waiting:
        try:
            status, body = read_response(sock, 30)
            answers[str(status) if b'"cancelled"' in body or status != 200 else "200_not_cancelled"] += 1
        except OSError as exc:
            answers[type(exc).__name__] += 1
        sock.close()
    still_open = attackers.close()
    return {
        "long_polls": long_polls,
        "half_open": half_open,
        "crowd_probes": probed,
        "crowd_opened_s": round(opened_s, 2),
        "crowd_measured_within_s": round(measured_s, 2),
        "healthz_p50_ms": round(percentile(health_ms, 0.50), 2),
        "healthz_p99_ms": round(percentile(health_ms, 0.99), 2),
        "crowd_submit_p50_ms": round(percentile(submit_ms, 0.50), 2),
        "crowd_submit_p99_ms": round(percentile(submit_ms, 0.99), 2),
        "crowd_probe_failures": dict(failures),
        "long_poll_answers": dict(answers),
        "half_open_cut_by_api": attackers.cut,
        "half_open_cut_after_s_p50": round(percentile(attackers.lifetimes_s, 0.5), 2),
        "half_open_open_at_end": still_open,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--processes", type=int, default=2, help="gunicorn processes (default 2)")
    parser.add_argument("--quota", type=int, default=100, help="RAGQ_MAX_OUTSTANDING_JOBS for the quota phase")
    parser.add_argument("--rate", type=int, default=200, help="RAGQ_RATE_LIMIT_PER_MIN for the rate phase")
    parser.add_argument("--long-polls", type=int, default=2000, help="long-polls held in the crowd phase (default 2000)")
    parser.add_argument("--half-open", type=int, default=500, help="half-open connections in the crowd phase (default 500)")
    parser.add_argument("--probes", type=int, default=200, help="/healthz and POST /v1/jobs probes in the crowd phase")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quota < 1 or args.quota + 20 > args.rate:
        parser.error("--quota must be at least 1, and --quota + 20 at most --rate (the quota phase must stay under the rate)")
    work = Path(tempfile.mkdtemp(prefix="ragq-load-"))
    from worker.tiny import build_tiny_model

    model = build_tiny_model(work / "tiny-t5", "t5")
    stack = Stack(
        work,
        RAGQ_MODEL=f"load={model}",
        RAGQ_MODELS="unserved=nowhere/none",
        RAGQ_API_KEYS=",".join(f"{tenant}:{key}" for tenant, key in KEYS.items()),
    )
    processes = ["--processes", str(args.processes)]
    figures: dict[str, Any] = {"processes": args.processes}
    try:
        # Phase 1 with quotas out of the way, phase 2 with them set low.
        phase1 = stack.env | {"RAGQ_RATE_LIMIT_PER_MIN": "1000000000"}
        workers = stack.start_workers(1, env=phase1)
        api = stack.start_api(*processes, env=phase1)
        figures.update(throughput(stack.url, args.clients, args.seconds))
        stack.stop([api, *workers])
        limits = {"RAGQ_MAX_OUTSTANDING_JOBS": str(args.quota), "RAGQ_RATE_LIMIT_PER_MIN": str(args.rate)}
        api = stack.start_api(*processes, env=stack.env | limits)
        figures.update(quotas(stack.url, args.quota, args.rate))
        stack.stop([api])
        # Phase 3: no quotas in the way; every long-poll is the same tenant's, so its cap must allow them all.
        crowd_env = phase1 | {"RAGQ_MAX_WAITS_PER_TENANT": str(max(1, args.long_polls))}
        stack.start_api(*processes, env=crowd_env)
        figures.update(crowd(stack.url, args.long_polls, args.half_open, args.probes))
    finally:
        stack.close()
    report(figures, args.json)
    ok = (
        figures["errors"] == 0
        and figures["healthz_p99_ms"] < 1000
        and figures["crowd_submit_p99_ms"] < 1000
        and not figures["crowd_probe_failures"]
        and figures["long_poll_answers"] == ({"200": args.long_polls} if args.long_polls else {})
        and (figures["half_open_cut_by_api"] > 0 or not args.half_open)
        and figures["quota_429"] == figures["quota_429_expected"]
        and figures["rate_429"] == figures["rate_429_expected"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
