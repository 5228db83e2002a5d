"""`ragq ask QUESTION`: submit one job, long-poll it, print the answer and its sources."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from cli.client import ApiClient, add_url_option, handles_api_errors
from shared.config import MAX_WAIT_S
from shared.jobs import JobStatus

# Added to a long-poll's own wait, so the HTTP timeout never cuts a wait the API is still honouring.
LONG_POLL_MARGIN_S = 30


@handles_api_errors
def cmd_ask(args: argparse.Namespace) -> int:
    """Submit the question, wait up to --timeout for its answer, print it; 0 only if the job succeeded."""
    body: dict[str, Any] = {"question": args.question}
    for name in ("course", "model", "top_k"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    client = ApiClient(args.url)
    job = client.request("POST", "/v1/jobs", expected=(202,), json=body).json()
    deadline = time.monotonic() + args.timeout
    while not JobStatus(job["status"]).is_final and time.monotonic() < deadline:
        wait_s = max(1, min(MAX_WAIT_S, int(deadline - time.monotonic())))
        job = client.get_json(f"/v1/jobs/{job['id']}", params={"wait": wait_s}, timeout_s=wait_s + LONG_POLL_MARGIN_S)
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        print_job(job)
    if job["status"] != JobStatus.SUCCEEDED:
        if not JobStatus(job["status"]).is_final:
            print(f"ragq: no answer within {args.timeout:g} s; job {job['id']} is {job['status']}", file=sys.stderr)
        return 1
    return 0


def print_job(job: dict[str, Any]) -> None:
    """The answer (or the job's error), its numbered sources and the model that served it."""
    if job["status"] == JobStatus.SUCCEEDED:
        print(job["answer"])
    else:
        error = job.get("error") or {}
        print(f"job {job['id']} {job['status']}: {error.get('message', '')}".rstrip(": "))
    if job.get("sources"):
        print("\nSources:")
        for rank, source in enumerate(job["sources"], 1):
            print(f"  {rank}. [{source['id']}] {source['course']} / {source['section']} / {source['question']}")
    print(f"\nmodel: {job.get('served_by') or job['model']}  job: {job['id']}")


def add_ask_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ask` to the `ragq` command's subparsers."""
    ask = commands.add_parser("ask", help="Ask one question and print the answer and its sources.")
    ask.add_argument("question")
    ask.add_argument("--course")
    ask.add_argument("--model")
    ask.add_argument("--top-k", type=int)
    add_url_option(ask)
    ask.add_argument("--json", action="store_true", help="print the whole job as JSON")
    ask.add_argument("--timeout", type=float, default=600, help="seconds to wait for the answer (default 600)")
    ask.set_defaults(func=cmd_ask)
