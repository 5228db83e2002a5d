"""`python -m bench.scale`: many workers on one Redis: throughput, interactive latency and what Redis pays.

For each worker count N (default 1, 2, 4, 8, 16) the same stack (one embedded Redis, the API under gunicorn) gets
N `python -m worker` processes serving a simulated accelerator (`worker/simulated.py`: device time is a sleep, so
many workers fit on a small machine as long as their bookkeeping is cheap). Workers are added between runs
(1, then 1 more, then 2 more, ...), never restarted. Each run has three phases:

1. idle (`--idle-s`): nothing submitted; Redis commands and worker CPU per second are the housekeeping cost
   (heartbeats, reaper turns, feeders, audits, Kombu's polling);
2. interactive only: `--interactive-jobs` jobs over `/v1/jobs`, one at a time, each collected by long-poll:
   Redis commands per interactive job (housekeeping of the phase's duration subtracted);
3. backlog: one `/v1/batches` file of `--backlog` items (the same file in every run), drained while a trickle of
   interactive jobs (`--trickle-per-worker-s` per worker: interactive jobs go first, so a trickle fixed in
   total would take a larger share of one worker than of sixteen and flatter the speed-up) arrives: items/s, its ratio to N x one worker's, interactive p50/p95,
   Redis CPU and commands per item (housekeeping and the trickle's jobs subtracted), Redis memory. Items/s is
   given twice: over the whole drain (backlog / drain time), and steady (between the 10th and 90th percentile of
   the items' finishing times), since the drain's start and end (about one microbatch each, workers filling
   or running out) weigh more in the short drain of many workers than in the long one of one.

Redis figures are deltas of `INFO cpu` and `INFO commandstats`; commands run inside Lua scripts count (the
transition script's `HSET`s are Redis work like any other), and the split by command is printed per run.

The simulated device: microbatches of `--microbatch-size` (16), `--new-tokens` (16) decode steps of
`--step-ms` (150) each, `cpu_share` 0: one worker answers about 6 items/s, so 16 use about 100 items/s of
bookkeeping (some 4 CPU ms each) on a 2-core machine. Workers run the model in-process (`RAGQ_ENGINE=thread`):
an engine child process per worker would double the processes and the memory (16 extra Python processes) for
nothing a sleeping simulated device needs.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests

from bench.backlog import backlog_body
from bench.common import Stack
from shared import redis_keys
from worker.simulated import write_spec_dir

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FULL = {"workers": "1,2,4,8,16", "backlog": 2880, "idle_s": 10.0, "interactive_jobs": 10, "trickle_per_worker_s": 0.05}
QUICK = {"workers": "1,2", "backlog": 48, "idle_s": 2.0, "interactive_jobs": 3, "trickle_per_worker_s": 0.1}


@dataclass
class RedisSample:
    """What Redis has done so far: CPU seconds, commands by name (scripts' inner commands included), memory."""

    cpu_s: float
    commands: dict[str, int]
    used_memory: int
    net_bytes: int
    at: float = field(default_factory=time.monotonic)

    @classmethod
    def take(cls, client: redis.Redis) -> RedisSample:
        cpu = client.info("cpu")
        stats = client.info("commandstats")
        commands = {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()}
        net = client.info("stats")
        return cls(
            float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
            commands,
            int(client.info("memory")["used_memory"]),
            int(net["total_net_input_bytes"]) + int(net["total_net_output_bytes"]),
        )

    def since(self, before: RedisSample) -> tuple[float, dict[str, int], float]:
        """CPU seconds, commands by name and seconds between `before` and this sample, the INFO calls left out."""
        commands = {n: c - before.commands.get(n, 0) for n, c in self.commands.items() if n != "info"}
        return self.cpu_s - before.cpu_s, {n: c for n, c in commands.items() if c}, self.at - before.at


def total(commands: dict[str, int]) -> int:
    return sum(commands.values())


class Trickle:
    """Interactive jobs over HTTP, one every `every_s`, each collected by a long-poll on a thread of its own."""

    def __init__(self, url: str, every_s: float, params: dict[str, Any]) -> None:
        self.url = url
        self.every_s = every_s
        self.params = params
        self.latencies_ms: list[float] = []
        self.failed: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.submitter = threading.Thread(target=self._submit, daemon=True)

    def one(self) -> None:
        """Submit one job and wait for its end; record its latency as the client saw it."""
        started = time.monotonic()
        job = requests.post(f"{self.url}/v1/jobs", json={"question": "How do I join the course?", "params": self.params}, timeout=30).json()
        while job["status"] in ("queued", "running"):
            job = requests.get(f"{self.url}/v1/jobs/{job['id']}", params={"wait": 60}, timeout=90).json()
        if job["status"] == "succeeded":
            self.latencies_ms.append((time.monotonic() - started) * 1000)
        else:
            self.failed.append(job)

    def _submit(self) -> None:
        # The first at once: a short backlog still gets interactive jobs beside it.
        while True:
            thread = threading.Thread(target=self.one, daemon=True)
            thread.start()
            self.threads.append(thread)
            if self.stop.wait(self.every_s):
                return

    def start(self) -> None:
        self.submitter.start()

    def finish(self) -> int:
        """Stop submitting, wait for the jobs in flight; how many were submitted."""
        self.stop.set()
        self.submitter.join()
        for thread in self.threads:
            thread.join(timeout=120)
        return len(self.threads)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1)


def measure(stack: Stack, client: redis.Redis, workers: int, args: argparse.Namespace, body: bytes, params: dict[str, Any]) -> dict[str, Any]:
    """The three phases of one run with `workers` workers up."""
    run: dict[str, Any] = {"workers": workers}
    cpu = stack.cpu_s

    # 1. Idle: housekeeping.
    before, worker_cpu = RedisSample.take(client), cpu()["worker"]
    time.sleep(args.idle_s)
    idle_cpu_s, idle_commands, idle_s = RedisSample.take(client).since(before)
    housekeeping_per_s = total(idle_commands) / idle_s
    run["housekeeping_redis_commands_per_s_per_worker"] = round(housekeeping_per_s / workers, 2)
    run["housekeeping_redis_cpu_ms_per_s_per_worker"] = round(idle_cpu_s * 1000 / idle_s / workers, 3)
    run["housekeeping_worker_cpu_ms_per_s_per_worker"] = round((cpu()["worker"] - worker_cpu) * 1000 / idle_s / workers, 2)
    run["housekeeping_commands"] = {n: round(c / idle_s / workers, 2) for n, c in sorted(idle_commands.items(), key=lambda x: -x[1])}

    # 2. Interactive jobs alone.
    interactive = Trickle(stack.url, 0, params)
    before = RedisSample.take(client)
    for _ in range(args.interactive_jobs):
        interactive.one()
    _, commands, seconds = RedisSample.take(client).since(before)
    per_job = (total(commands) - housekeeping_per_s * seconds) / args.interactive_jobs
    run["redis_commands_per_interactive_job"] = round(per_job, 1)
    run["interactive_commands"] = split(commands, idle_commands, idle_s, seconds, args.interactive_jobs)
    run["interactive_idle_p50_ms"] = percentile(interactive.latencies_ms, 0.5)

    # 3. The backlog, with the trickle.
    before, cpu_before = RedisSample.take(client), cpu()
    trickle = Trickle(stack.url, 1 / (args.trickle_per_worker_s * workers), params)
    response = requests.post(f"{stack.url}/v1/batches", data=body, headers={"Content-Type": "application/x-ndjson"}, timeout=600)
    response.raise_for_status()
    batch_id = response.json()["id"]
    memory_queued = int(client.info("memory")["used_memory"])
    trickle.start()
    while client.hget(redis_keys.batch(batch_id), "status") == "in_progress":
        time.sleep(0.5)
    submitted = trickle.finish()
    after, cpu_after = RedisSample.take(client), cpu()
    redis_cpu_s, commands, seconds = after.since(before)
    record = client.hgetall(redis_keys.batch(batch_id))
    drain_s = float(record["completed_at"]) - float(record["created_at"])
    counts = client.hgetall(redis_keys.batch_counts(batch_id))
    run["backlog_items"] = args.backlog
    run["backlog_succeeded"] = int(counts.get("succeeded", 0))
    run["drain_s"] = round(drain_s, 2)
    run["items_per_s"] = round(args.backlog / drain_s, 2)
    run["items_per_s_steady"] = steady_rate(client, batch_id)
    run["interactive_jobs_during_backlog"] = submitted
    run["interactive_failed"] = len(trickle.failed)
    run["interactive_p50_ms"] = percentile(trickle.latencies_ms, 0.5)
    run["interactive_p95_ms"] = percentile(trickle.latencies_ms, 0.95)
    trickle_commands = per_job * submitted
    run["redis_commands_per_item"] = round((total(commands) - housekeeping_per_s * seconds - trickle_commands) / args.backlog, 1)
    run["backlog_commands"] = split(commands, idle_commands, idle_s, seconds, args.backlog + submitted)
    run["redis_cpu_ms_per_job"] = round(redis_cpu_s * 1000 / (args.backlog + submitted), 3)
    # Both directions, housekeeping included: what the Redis host's network carries per job at this load.
    run["redis_net_bytes_per_job"] = round((after.net_bytes - before.net_bytes) / (args.backlog + submitted))
    run["redis_net_mb_per_s"] = round((after.net_bytes - before.net_bytes) / seconds / 1e6, 3)
    run["redis_cpu_share"] = round(redis_cpu_s / seconds, 3)
    run["redis_used_memory_mb_queued"] = round(memory_queued / 1e6, 1)
    run["redis_bytes_per_queued_item"] = round((memory_queued - before.used_memory) / args.backlog)
    # Finished jobs stay for RAGQ_RESULT_TTL_S: what each costs until then (answers and timings included).
    run["redis_bytes_per_finished_job"] = round((after.used_memory - before.used_memory) / (args.backlog + submitted))
    run["cpu_ms_per_job"] = {n: round((cpu_after[n] - cpu_before[n]) * 1000 / (args.backlog + submitted), 2) for n in cpu_before}
    return run


def steady_rate(client: redis.Redis, batch_id: str) -> float | None:
    """Items/s between the 10th and the 90th percentile of the items' finishing times: the drain without its
    start (workers filling their first microbatches) and its end (the last microbatches, some workers idle)."""
    job_ids = client.lrange(redis_keys.batch_jobs(batch_id), 0, -1)
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(redis_keys.job(job_id), "finished_at")
    finished = sorted(float(t) for t in pipe.execute() if t)
    if len(finished) < 10:
        return None
    first, last = int(0.1 * len(finished)), int(0.9 * len(finished))
    return round((last - first) / max(finished[last] - finished[first], 1e-9), 2)


def split(commands: dict[str, int], idle: dict[str, int], idle_s: float, seconds: float, jobs: int) -> dict[str, float]:
    """Commands per job by name, each name's housekeeping rate over `seconds` subtracted, largest first."""
    per_job = {n: (c - idle.get(n, 0) / idle_s * seconds) / jobs for n, c in commands.items()}
    return {n: round(v, 2) for n, v in sorted(per_job.items(), key=lambda x: -x[1]) if abs(v) >= 0.05}


def print_run(run: dict[str, Any]) -> None:
    print(f"  {run['workers']} workers: {run['items_per_s']} items/s (x{run.get('speedup')}, ratio {run.get('ratio_to_n_x_one')}), "
          f"interactive p50/p95 {run['interactive_p50_ms']}/{run['interactive_p95_ms']} ms", flush=True)
    print(f"    Redis commands per backlog item {run['redis_commands_per_item']}: {fmt(run['backlog_commands'])}")
    print(f"    Redis commands per interactive job {run['redis_commands_per_interactive_job']}: {fmt(run['interactive_commands'])}")
    print(f"    housekeeping per worker per s: {run['housekeeping_redis_commands_per_s_per_worker']} commands "
          f"({fmt(run['housekeeping_commands'])}), worker CPU {run['housekeeping_worker_cpu_ms_per_s_per_worker']} ms", flush=True)


def fmt(commands: dict[str, float]) -> str:
    return ", ".join(f"{n} {v}" for n, v in list(commands.items())[:12])


def table(runs: list[dict[str, Any]]) -> None:
    columns: list[tuple[str, str, Callable[[dict[str, Any]], Any]]] = [
        ("workers", ">7", lambda r: r["workers"]),
        ("items/s", ">8", lambda r: r["items_per_s"]),
        ("ratio", ">6", lambda r: r.get("ratio_to_n_x_one")),
        ("steady/s", ">8", lambda r: r.get("items_per_s_steady")),
        ("ratio", ">6", lambda r: r.get("steady_ratio_to_n_x_one")),
        ("p50 ms", ">7", lambda r: r["interactive_p50_ms"]),
        ("p95 ms", ">7", lambda r: r["interactive_p95_ms"]),
        ("cmd/item", ">8", lambda r: r["redis_commands_per_item"]),
        ("cmd/job", ">7", lambda r: r["redis_commands_per_interactive_job"]),
        ("Redis CPU ms/job", ">16", lambda r: r["redis_cpu_ms_per_job"]),
        ("Redis CPU", ">9", lambda r: r["redis_cpu_share"]),
        ("MB queued", ">9", lambda r: r["redis_used_memory_mb_queued"]),
        ("hk cmd/s/w", ">10", lambda r: r["housekeeping_redis_commands_per_s_per_worker"]),
        ("hk CPU ms/s/w", ">13", lambda r: r["housekeeping_worker_cpu_ms_per_s_per_worker"]),
    ]
    print("  ".join(f"{name:{align}}" for name, align, _ in columns))
    for run in runs:
        print("  ".join(f"{'' if get(run) is None else get(run)!s:{align}}" for _, align, get in columns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 and 2 workers, a small backlog")
    parser.add_argument("--workers", help=f"comma-separated worker counts, ascending (default {FULL['workers']})")
    parser.add_argument("--backlog", type=int, help=f"items of the batch every run drains (default {FULL['backlog']})")
    parser.add_argument("--idle-s", type=float, help="seconds of the idle (housekeeping) phase")
    parser.add_argument("--interactive-jobs", type=int, help="jobs of the interactive-only phase")
    parser.add_argument("--trickle-per-worker-s", type=float, help="interactive jobs per second and worker during the backlog")
    parser.add_argument("--microbatch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--step-ms", type=float, default=150.0, help="simulated device time per decode step")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    counts = [int(n) for n in str(args.workers).split(",")]
    if counts != sorted(counts) or counts[0] < 1:
        parser.error("--workers must be ascending and at least 1")
    if not (args.data / "questions-dev.csv").exists():
        print(f"bench.scale needs the course data in {args.data}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="ragq-bench-scale-"))
    model = write_spec_dir(work / "sim", "flan-t5-xl-h200", cpu_share=0.0, step_base_ms=args.step_ms)
    params = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "num_beams": 1}
    body = backlog_body(args.backlog, args.data, params)
    stack = Stack(
        work,
        RAGQ_MODEL=f"sim={model}",
        RAGQ_DOCUMENTS=str(args.data / "documents.json"),
        RAGQ_ENGINE="thread",
        RAGQ_MAX_BATCH_SIZE=str(args.microbatch_size),
        RAGQ_API_THREADS="64",
    )
    runs: list[dict[str, Any]] = []
    # A `timeout` or Ctrl-C still stops the stack's processes (the `finally` below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        stack.start_api()
        client = stack.client()
        up = 0
        for n in counts:
            print(f"starting {n - up} more worker(s) ...", flush=True)
            stack.start_workers(n - up, "--loglevel", "WARNING", timeout_s=600)
            up = n
            run = measure(stack, client, n, args, body, params)
            one = runs[0]["items_per_s"] if runs and runs[0]["workers"] == 1 else (run["items_per_s"] if n == 1 else None)
            run["speedup"] = round(run["items_per_s"] / one, 2) if one else None
            run["ratio_to_n_x_one"] = round(run["items_per_s"] / (n * one), 3) if one else None
            steady_one = runs[0]["items_per_s_steady"] if runs and runs[0]["workers"] == 1 else (run["items_per_s_steady"] if n == 1 else None)
            if steady_one and run["items_per_s_steady"]:
                run["steady_ratio_to_n_x_one"] = round(run["items_per_s_steady"] / (n * steady_one), 3)
            runs.append(run)
            print_run(run)
    finally:
        stack.close()
    print()
    print(f"simulated device: microbatches of {args.microbatch_size}, {args.new_tokens} steps of {args.step_ms} ms; "
          f"backlog {args.backlog} items; trickle {args.trickle_per_worker_s}/s per worker; RAGQ_ENGINE=thread")
    table(runs)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: getattr(args, k) for k in ("backlog", "microbatch_size", "new_tokens", "step_ms", "trickle_per_worker_s", "idle_s")}
        args.json.write_text(json.dumps({"config": config, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
