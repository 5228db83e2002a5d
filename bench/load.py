"""`python -m bench.load`: the API under load on loopback: submit, long-poll and read latency, and 429s exactly where
quotas say.

Starts an embedded Redis, the API under gunicorn with three tenants' keys, and one worker with a tiny local T5
(4 new tokens a job). Phase 1: `--clients` threads, each with its own keep-alive session, for `--seconds`:
submit a job, long-poll it (`?wait=30`) until it is finished, read it once more; reports requests/s, p50/p99
of submit and of the plain read, and how long after a job finished its long-poll answered (p50/p99), plus
every error (5xx or no answer: must be 0). Phase 2: tenant `capped` submits `--quota` + 20 jobs against
`RAGQ_MAX_OUTSTANDING_JOBS=--quota` (for a model no worker serves, so none finishes; exactly 20 must be refused),
and tenant `limited` sends `--rate` + 20 requests within a minute against `RAGQ_RATE_LIMIT_PER_MIN=--rate`
(exactly 20 refused). `--json PATH` writes the figures.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--processes", type=int, default=2, help="gunicorn processes (default 2)")
    parser.add_argument("--quota", type=int, default=100, help="RAGQ_MAX_OUTSTANDING_JOBS for the quota phase")
    parser.add_argument("--rate", type=int, default=200, help="RAGQ_RATE_LIMIT_PER_MIN for the rate phase")
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
        stack.start_api(*processes, env=stack.env | limits)
        figures.update(quotas(stack.url, args.quota, args.rate))
    finally:
        stack.close()
    report(figures, args.json)
    ok = (
        figures["errors"] == 0
        and figures["quota_429"] == figures["quota_429_expected"]
        and figures["rate_429"] == figures["rate_429_expected"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
