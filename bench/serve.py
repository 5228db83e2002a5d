"""`python -m bench.serve`: `ragq serve` tried as a new user would, with figures.

Starts `ragq serve` (embedded Redis) with a tiny local model and the course FAQ, asks N course questions
concurrently over HTTP with long-polls, checks every job succeeded with the sources plain minsearch gives
(the course's settings), sends bad requests, stops the server with SIGTERM and checks nothing is left
running. Prints a table and writes the figures as JSON with `--json PATH`.
"""

from __future__ import annotations

import argparse
import csv
import json
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import minsearch
import requests

from bench.common import child_env, report
from cli.redis_server import free_port

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def seed_search(documents_path: Path) -> Any:
    """The course notebook's retrieval, untouched: returns a search(question, course) -> ids function."""
    from worker.corpus import document_id

    docs = []
    for course in json.loads(documents_path.read_text()):
        for doc in course["documents"]:
            docs.append({**doc, "course": course["course"]})
    index = minsearch.Index(text_fields=["question", "text", "section"], keyword_fields=["course"])
    index.fit(docs)

    def search(question: str, course: str) -> list[str]:
        results = index.search(
            question, filter_dict={"course": course}, boost_dict={"question": 3.0, "section": 0.5}, num_results=5
        )
        return [document_id(d["course"], d["question"], d["text"]) for d in results]

    return search


def process_tree(pid: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = set(), [pid]
    while frontier:
        current = frontier.pop()
        children = {c for c, p in parents.items() if p == current} - found
        found |= children
        frontier += children
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60, help="questions to ask (default 60)")
    parser.add_argument("--concurrency", type=int, default=60, help="clients at once (default 60)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", help="model directory (default: a tiny T5 built here)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if not (DATA / "documents.json").exists():
        print(f"bench.serve needs the course data in {DATA}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="ragq-bench-serve-"))
    model = args.model
    if model is None:
        from worker.tiny import build_tiny_model

        model = str(build_tiny_model(work / "tiny-t5", "t5"))
    with (DATA / "questions-dev.csv").open() as f:
        questions = list(csv.DictReader(f))[: args.n]
    expected = seed_search(DATA / "documents.json")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = child_env(
        RAGQ_MODEL=model,
        RAGQ_DOCUMENTS=str(DATA / "documents.json"),
        RAGQ_PORT=str(port),
        RAGQ_DATA_DIR=str(work / "data"),
    )
    serve = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--workers", str(args.workers)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in serve.stdout or []], daemon=True).start()
    started = time.monotonic()
    while True:
        line = lines.get(timeout=300)
        if "ragq: serving" in line:
            break
    startup_s = time.monotonic() - started

    def ask(row: dict[str, str]) -> dict[str, Any]:
        t0 = time.monotonic()
        job = requests.post(f"{url}/v1/jobs", json={"question": row["question"], "course": row["course"]}, timeout=30).json()
        while job["status"] in ("queued", "running"):
            job = requests.get(f"{url}/v1/jobs/{job['id']}", params={"wait": 60}, timeout=90).json()
        return {"job": job, "latency_ms": (time.monotonic() - t0) * 1000, "row": row}

    t0 = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(ask, questions))
    wall_s = time.monotonic() - t0

    bad_requests = [
        requests.post(f"{url}/v1/jobs", data="{bad", headers={"Content-Type": "application/json"}, timeout=10),
        requests.post(f"{url}/v1/jobs", json={"question": ""}, timeout=10),
        requests.post(f"{url}/v1/jobs", json={"question": "x", "params": {"num_beams": 99}}, timeout=10),
        requests.get(f"{url}/v1/jobs/00000000-0000-4000-8000-000000000000", timeout=10),
    ]
    bad_ok = all(400 <= r.status_code < 500 and "error" in r.json() for r in bad_requests)

    tree = process_tree(serve.pid)
    serve.send_signal(signal.SIGTERM)
    exit_code = serve.wait(120)
    time.sleep(0.5)
    left = [pid for pid in tree if Path(f"/proc/{pid}").exists()]

    succeeded = sum(r["job"]["status"] == "succeeded" for r in results)
    sources_match = sum(
        [s["id"] for s in r["job"]["sources"]] == expected(r["row"]["question"], r["row"]["course"]) for r in results
    )
    latencies = sorted(r["latency_ms"] for r in results)
    figures = {
        "n": len(results),
        "concurrency": args.concurrency,
        "workers": args.workers,
        "succeeded": succeeded,
        "sources_identical_to_seed": sources_match,
        "bad_requests_4xx_json": bad_ok,
        "startup_s": round(startup_s, 2),
        "wall_s": round(wall_s, 2),
        "jobs_per_s": round(len(results) / wall_s, 2),
        "latency_p50_ms": round(statistics.median(latencies), 1),
        "latency_p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))], 1),
        "serve_exit_code": exit_code,
        "processes_left_after_sigterm": len(left),
        "processes_started": len(tree),
    }
    report(figures, args.json)
    ok = succeeded == sources_match == len(results) and bad_ok and not left and exit_code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
