"""`python -m bench.chaos`: nothing lost while workers are killed and Redis restarts.

Starts an embedded Redis (AOF), the API and K workers (a tiny local T5, the built-in corpus), submits N jobs
as one batch, then SIGKILLs a random worker every few seconds (starting a replacement, as `ragq serve` does)
and kills and restarts Redis once. Workers append every run and every stored result to a ledger file outside
Redis. It prints submitted, succeeded, failed, lost (must be 0), duplicate executions, duplicate visible results
(must be 0), the recovery time after each kill, and jobs/s; `--json PATH` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

from bench.common import Stack, report
from cli.redis_server import start_redis
from shared import redis_keys

PARAMS = {"max_new_tokens": 8, "min_new_tokens": 8, "num_beams": 1}
QUESTIONS = ["How do I add more workers?", "What does ragq serve start?", "How are errors reported?", "How do I cancel?"]


class Chaos:
    """The stack under test: API and workers on a tiny T5, with a ledger of every run and every stored result."""

    def __init__(self, work: Path) -> None:
        from worker.tiny import build_tiny_model

        self.work = work
        self.ledger = work / "ledger.jsonl"
        model = build_tiny_model(work / "tiny-t5", "t5")
        self.stack = Stack(
            work,
            RAGQ_MODEL=f"chaos={model}",
            RAGQ_EXECUTION_LEDGER=str(self.ledger),
            RAGQ_MAX_BATCH_SIZE="8",
            # A job still running this long (+30 s) under a live worker is re-queued (a backstop).
            RAGQ_TASK_TIME_LIMIT_S="60",
        )
        self.url = self.stack.url
        self.workers: list[subprocess.Popen[bytes]] = []

    def start(self, workers: int) -> None:
        self.stack.start_api()
        self.workers = self.stack.start_workers(workers)

    def api_ready(self) -> bool:
        return self.stack.api_ready()

    def kill_worker(self) -> str:
        index = random.randrange(len(self.workers))
        victim = self.workers[index]
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        # As `ragq serve` does: a replacement, whose start-up is part of what is measured.
        self.workers[index] = self.stack.spawn("worker")
        return f"worker pid {victim.pid}"

    def restart_redis(self, down_s: float) -> None:
        redis_server = self.stack.redis
        redis_server.process.kill()
        redis_server.process.wait()
        time.sleep(down_s)
        self.stack.redis = start_redis(
            self.work / "redis", port=redis_server.port, password=redis_server.password, appendonly=True
        )

    def where_are(self, batch_id: str) -> list[dict[str, Any]]:
        """Where each unfinished job of the batch stands in Redis: what a lost job's report needs."""
        client = self.stack.client()
        held = {tag: raw for tag, raw in client.hgetall("unacked").items()}
        queues = {name: client.lrange(name, 0, -1) for name in client.keys("ragq.model.*")}
        sets = {name: client.smembers(name) for name in client.keys(redis_keys.worker_jobs("*"))}
        pending = set(client.lrange(redis_keys.batch_pending(batch_id), 0, -1))
        found = []
        for job_id in client.lrange(redis_keys.batch_jobs(batch_id), 0, -1):
            record = client.hgetall(redis_keys.job(job_id))
            if record.get("status") in ("succeeded", "failed"):
                continue
            found.append({
                "job_id": job_id,
                "record": {k: v for k, v in record.items() if k in ("status", "worker", "attempts", "started_at", "created_at")},
                "unacked": [tag for tag, raw in held.items() if job_id in raw],
                "queues": [name for name, items in queues.items() if any(job_id in item for item in items)],
                "worker_sets": [name for name, members in sets.items() if job_id in members],
                "pending": job_id in pending,
                "noted_as_sent": client.zscore(redis_keys.sent(json.loads(record["model"])), job_id) is not None,
            })
        return found

    def stop(self) -> None:
        self.stack.close()


def request_ok(method: str, url: str, **kwargs: Any) -> requests.Response | None:
    try:
        response = requests.request(method, url, timeout=30, **kwargs)
        return response if response.ok else None
    except requests.RequestException:
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ragq-chaos-"))
    chaos = Chaos(work)
    figures: dict[str, Any] = {"workers": args.workers, "submitted": args.jobs}
    try:
        chaos.start(args.workers)
        body = "\n".join(
            json.dumps({"custom_id": str(i), "question": QUESTIONS[i % len(QUESTIONS)], "params": PARAMS}) for i in range(args.jobs)
        )
        started = time.monotonic()
        response = requests.post(
            f"{chaos.url}/v1/batches", data=body, headers={"Content-Type": "application/x-ndjson"}, timeout=120
        )
        response.raise_for_status()
        batch_id = response.json()["id"]
        kills: list[tuple[float, str]] = []
        redis_restart: dict[str, float] = {}
        next_kill = time.monotonic() + args.kill_every_s
        deadline = time.monotonic() + args.timeout_s
        batch: dict[str, Any] = {}
        while time.monotonic() < deadline:
            answer = request_ok("GET", f"{chaos.url}/v1/batches/{batch_id}")
            if answer is not None:
                batch = answer.json()
                if batch["status"] != "in_progress":
                    break
                done = batch["request_counts"]["succeeded"] + batch["request_counts"]["failed"]
                if args.redis_restart and not redis_restart and done >= args.jobs // 3:
                    t0 = time.monotonic()
                    chaos.restart_redis(args.redis_down_s)
                    redis_restart["down_s"] = args.redis_down_s
                    while not chaos.api_ready():
                        time.sleep(0.1)
                    redis_restart["api_ready_after_s"] = round(time.monotonic() - t0, 2)
                    redis_restart["at_done"] = done
            if time.monotonic() >= next_kill and len(kills) < args.kills:
                kills.append((time.time(), chaos.kill_worker()))
                next_kill = time.monotonic() + args.kill_every_s
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        if redis_restart:
            figures["redis_restart"] = redis_restart
        counts = batch.get("request_counts", {})
        events = [json.loads(line) for line in chaos.ledger.read_text().splitlines()] if chaos.ledger.exists() else []
        runs = Counter(e["job_id"] for e in events if e["event"] == "run")
        results = Counter(e["job_id"] for e in events if e["event"] == "result")
        figures.update(
            succeeded=counts.get("succeeded", 0),
            failed=counts.get("failed", 0),
            lost=args.jobs - counts.get("succeeded", 0) - counts.get("failed", 0),
            duplicate_executions=sum(n - 1 for n in runs.values() if n > 1),
            duplicate_visible_results=sum(1 for n in results.values() if n > 1),
            worker_kills=len(kills),
            recovery_s_after_each_kill=[round(_recovery_s(events, t), 2) for t, _ in kills],
            jobs_per_s=round(args.jobs / elapsed, 2),
            seconds=round(elapsed, 1),
            batch_status=batch.get("status"),
        )
        if figures["failed"]:
            failed = requests.get(f"{chaos.url}/v1/batches/{batch_id}/results", params={"status": "failed"}, timeout=60)
            errors = Counter((json.loads(line).get("error") or {}).get("type") for line in failed.text.splitlines())
            figures["failed_by_error"] = dict(errors)
        if figures["lost"]:
            figures["unfinished"] = chaos.where_are(batch_id)
    finally:
        chaos.stop()
    return figures


def _recovery_s(events: list[dict[str, Any]], killed_at: float) -> float:
    """Seconds from a kill until the next result is stored by any worker: how long the system stalled."""
    after = [e["t"] for e in events if e["event"] == "result" and e["t"] > killed_at]
    return (min(after) - killed_at) if after else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs to run (100000 for the overnight figure)")
    parser.add_argument("--kills", type=int, default=6, help="worker SIGKILLs")
    parser.add_argument("--kill-every-s", type=float, default=4.0)
    parser.add_argument("--no-redis-restart", dest="redis_restart", action="store_false")
    parser.add_argument("--redis-down-s", type=float, default=2.0)
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    figures = run(args)
    report(figures, args.json)
    ok = figures.get("lost") == 0 and figures.get("duplicate_visible_results") == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
