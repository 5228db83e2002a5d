"""`python -m bench.backlog`: how ragq takes an overnight backlog.

Starts an embedded Redis and the API under gunicorn (`python -m api`), then measures:

1. accepting: one batch of N lines (default 100,000 course questions) POSTed as JSONL: lines/s accepted, and
   bytes of Redis memory per queued item; then cancelling it (items/s cancelled);
2. with one `python -m worker` (a tiny local T5): the interactive latency on an idle worker, then the latency of an
   interactive job submitted behind a backlog of B items (default 5,000), against the target
   2 x idle latency + one batch's time; and the backlog's drain rate.

Prints a table and writes the figures as JSON with `--json PATH`.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from bench.common import Stack, report

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORK = {"max_new_tokens": 16, "min_new_tokens": 16, "num_beams": 1}


def backlog_body(n: int, data: Path, params: dict[str, Any] | None = None) -> bytes:
    with (data / "questions-dev.csv").open() as f:
        rows = list(csv.DictReader(f))
    lines = []
    for i in range(n):
        row = rows[i % len(rows)]
        line: dict[str, Any] = {"custom_id": str(i), "question": row["question"], "course": row["course"]}
        if params:
            line["params"] = params
        lines.append(json.dumps(line))
    return "\n".join(lines).encode()


def start_stack(work: Path, data: Path) -> Stack:
    """Redis and the API, for a tiny local T5 named `bench` over the course FAQ; workers come later."""
    from worker.tiny import build_tiny_model

    model = build_tiny_model(work / "tiny-t5", "t5")
    stack = Stack(work, RAGQ_MODEL=f"bench={model}", RAGQ_DOCUMENTS=str(data / "documents.json"))
    try:
        stack.start_api()
    except RuntimeError:
        stack.close()
        raise
    return stack


def interactive_latency_ms(url: str) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    job = requests.post(f"{url}/v1/jobs", json={"question": "How do I get started?", "params": WORK}, timeout=30).json()
    while job["status"] in ("queued", "running"):
        job = requests.get(f"{url}/v1/jobs/{job['id']}", params={"wait": 60}, timeout=90).json()
    return (time.monotonic() - started) * 1000, job


def batch(url: str, batch_id: str) -> dict[str, Any]:
    return dict(requests.get(f"{url}/v1/batches/{batch_id}", timeout=30).json())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000, help="lines of the batch whose acceptance is measured")
    parser.add_argument("--backlog", type=int, default=5_000, help="queued items ahead of the interactive job")
    parser.add_argument("--drain-s", type=float, default=30, help="seconds over which the drain rate is measured")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.data / "questions-dev.csv").exists():
        print(f"bench.backlog needs the course data in {args.data}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="ragq-bench-backlog-"))
    stack = start_stack(work, args.data)
    client = stack.client()
    figures: dict[str, Any] = {"lines": args.lines, "backlog": args.backlog}
    try:
        body = backlog_body(args.lines, args.data)
        figures["file_mb"] = round(len(body) / 1e6, 1)
        memory_before = int(client.info("memory")["used_memory"])
        started = time.monotonic()
        response = requests.post(
            f"{stack.url}/v1/batches", data=body, headers={"Content-Type": "application/x-ndjson"}, params={"model": "bench"}, timeout=600
        )
        accept_s = time.monotonic() - started
        response.raise_for_status()
        big = response.json()
        memory_after = int(client.info("memory")["used_memory"])
        figures["accept_s"] = round(accept_s, 2)
        figures["lines_per_s_accepted"] = round(args.lines / accept_s)
        figures["redis_bytes_per_queued_item"] = round((memory_after - memory_before) / args.lines)
        started = time.monotonic()
        requests.post(f"{stack.url}/v1/batches/{big['id']}/cancel", timeout=600).raise_for_status()
        figures["cancel_items_per_s"] = round(args.lines / (time.monotonic() - started))

        stack.start_workers(1)
        idle = [interactive_latency_ms(stack.url)[0] for _ in range(5)]
        figures["interactive_idle_ms"] = round(statistics.median(idle), 1)

        backlog = requests.post(
            f"{stack.url}/v1/batches",
            data=backlog_body(args.backlog, args.data, WORK),
            headers={"Content-Type": "application/x-ndjson"},
            params={"model": "bench"},
            timeout=600,
        ).json()
        while batch(stack.url, backlog["id"])["request_counts"]["succeeded"] == 0:
            time.sleep(0.1)
        queued = batch(stack.url, backlog["id"])["request_counts"]["queued"]
        latency_ms, job = interactive_latency_ms(stack.url)
        figures["queued_when_interactive_submitted"] = queued
        figures["interactive_behind_backlog_ms"] = round(latency_ms, 1)
        figures["interactive_behind_backlog_timings"] = job["timings"]
        # One batch's time: the generate call of a full backlog batch.
        done = requests.get(f"{stack.url}/v1/batches/{backlog['id']}/results", params={"status": "succeeded"}, timeout=60)
        item = json.loads(done.content.splitlines()[-1])
        batch_ms = requests.get(f"{stack.url}/v1/jobs/{item['job_id']}", timeout=30).json()["timings"]["generation_ms"]
        figures["one_batch_ms"] = round(batch_ms, 1)
        figures["interactive_target_ms"] = round(2 * figures["interactive_idle_ms"] + batch_ms, 1)
        figures["interactive_target_met"] = latency_ms < figures["interactive_target_ms"]

        first = batch(stack.url, backlog["id"])["request_counts"]
        t0 = time.monotonic()
        time.sleep(args.drain_s)
        last = batch(stack.url, backlog["id"])["request_counts"]
        figures["drain_items_per_s"] = round((last["succeeded"] - first["succeeded"]) / (time.monotonic() - t0), 2)
        requests.post(f"{stack.url}/v1/batches/{backlog['id']}/cancel", timeout=600)
    finally:
        stack.close()
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
