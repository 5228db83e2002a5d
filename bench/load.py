"""`python -m bench.load`: the API under load on loopback: submit and poll latency, and 429s exactly where quotas say.

Starts an embedded Redis and the API under gunicorn with two tenants' keys (no worker: jobs stay queued, so
this measures the API and Redis alone). Phase 1: `--clients` threads, each with its own keep-alive session,
submit jobs and read them back for `--seconds`; reports requests/s and p50/p99 of submit and poll. Phase 2:
tenant `capped` submits `--quota` + 20 jobs against `RAGQ_MAX_OUTSTANDING_JOBS=--quota` (expect exactly 20
refusals), and tenant `limited` sends `--rate` + 20 requests within a minute against
`RAGQ_RATE_LIMIT_PER_MIN=--rate` (expect exactly 20). `--json PATH` writes the figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

from bench.common import child_env, report, start_api, stop_groups
from shared.redis_server import free_port, start_redis

KEYS = {
    "load": "load-key-0123456789abcdef",
    "capped": "capped-key-0123456789abcdef",
    "limited": "limited-key-0123456789abcdef",
}
JOB = {"question": "How do I run more workers?", "course": "ragq", "params": {"max_new_tokens": 8}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def headers(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def throughput(url: str, clients: int, seconds: float) -> dict[str, Any]:
    """Each client submits a job, reads it back, and again, until time is up."""
    submit_ms: list[float] = []
    poll_ms: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        session = requests.Session()
        session.headers.update(headers("load"))
        mine_submit, mine_poll, mine_statuses = [], [], Counter()
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            response = session.post(f"{url}/v1/jobs", json=JOB, timeout=30)
            mine_submit.append((time.perf_counter() - t0) * 1000)
            mine_statuses[response.status_code] += 1
            if response.status_code != 202:
                continue
            t0 = time.perf_counter()
            read = session.get(f"{url}/v1/jobs/{response.json()['id']}", timeout=30)
            mine_poll.append((time.perf_counter() - t0) * 1000)
            mine_statuses[read.status_code] += 1
        with lock:
            submit_ms.extend(mine_submit)
            poll_ms.extend(mine_poll)
            statuses.update(mine_statuses)

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return {
        "clients": clients,
        "requests": sum(statuses.values()),
        "requests_per_s": round(sum(statuses.values()) / elapsed, 1),
        "submit_p50_ms": round(percentile(submit_ms, 0.50), 2),
        "submit_p99_ms": round(percentile(submit_ms, 0.99), 2),
        "poll_p50_ms": round(percentile(poll_ms, 0.50), 2),
        "poll_p99_ms": round(percentile(poll_ms, 0.99), 2),
        "submit_mean_ms": round(statistics.fmean(submit_ms), 2) if submit_ms else None,
        "server_errors": sum(n for status, n in statuses.items() if status >= 500),
        "unexpected_statuses": {str(s): n for s, n in statuses.items() if s not in (200, 202)},
    }


def quotas(url: str, quota: int, rate: int) -> dict[str, Any]:
    """429s from the outstanding-jobs quota and from the rate limit, against how many were expected."""
    session = requests.Session()
    session.headers.update(headers("capped"))
    capped: Counter[str] = Counter()
    for _ in range(quota + 20):
        response = session.post(f"{url}/v1/jobs", json=JOB, timeout=30)
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
    redis = start_redis(work / "redis", appendonly=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    base = child_env(
        REDIS_URL=redis.url,
        RAGQ_PORT=str(port),
        RAGQ_DATA_DIR=str(work / "data"),
        RAGQ_API_KEYS=",".join(f"{tenant}:{key}" for tenant, key in KEYS.items()),
    )
    figures: dict[str, Any] = {"processes": args.processes}
    try:
        # Phase 1 with quotas out of the way, phase 2 with them set low.
        api = start_api(work, base | {"RAGQ_RATE_LIMIT_PER_MIN": "1000000000"}, args.processes)
        try:
            figures.update(throughput(url, args.clients, args.seconds))
        finally:
            stop_groups([api])
        limits = {"RAGQ_MAX_OUTSTANDING_JOBS": str(args.quota), "RAGQ_RATE_LIMIT_PER_MIN": str(args.rate)}
        api = start_api(work, base | limits, args.processes)
        try:
            figures.update(quotas(url, args.quota, args.rate))
        finally:
            stop_groups([api])
    finally:
        redis.stop()
    report(figures, args.json)
    ok = (
        figures["server_errors"] == 0
        and figures["quota_429"] == figures["quota_429_expected"]
        and figures["rate_429"] == figures["rate_429_expected"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
