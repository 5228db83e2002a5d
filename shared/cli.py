"""The `ragq` command: serve (everything on one machine), worker, api, ask, batch, eval, keys."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import requests

from shared.batch_cli import add_batch_commands, auth_headers
from shared.config import MAX_WAIT_S, Settings
from shared.errors import RagqError

DEFAULT_URL = "http://127.0.0.1:8000"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RagqError as exc:
        print(f"ragq: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragq", description="Retrieval-augmented question answering jobs.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="Run Redis (if REDIS_URL is unset), workers and the API on this machine.")
    serve.add_argument("--host", help="API address (default RAGQ_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="API port (default RAGQ_PORT or 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes for the default model (default 1)")
    serve.add_argument(
        "--no-fallback", action="store_true", help="fail instead of serving a tiny stand-in model when the model cannot be had"
    )
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser("worker", help="Run a Celery worker for one model's queue.")
    worker.add_argument("--model", help="served model name (default RAGQ_WORKER_MODEL or the default model)")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=cmd_worker)

    api = commands.add_parser("api", help="Run the HTTP API under gunicorn.")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.add_argument("--processes", type=int, default=1, help="gunicorn worker processes (default 1)")
    api.set_defaults(func=cmd_api)

    ask = commands.add_parser("ask", help="Ask one question and print the answer and its sources.")
    ask.add_argument("question")
    ask.add_argument("--course")
    ask.add_argument("--model")
    ask.add_argument("--top-k", type=int)
    ask.add_argument("--url", default=DEFAULT_URL, help=f"the API (default {DEFAULT_URL})")
    ask.add_argument("--json", action="store_true", help="print the whole job as JSON")
    ask.add_argument("--timeout", type=float, default=600, help="seconds to wait for the answer (default 600)")
    ask.set_defaults(func=cmd_ask)
    add_batch_commands(commands)

    keys_command = commands.add_parser("keys", help="Manage API keys.")
    keys_commands = keys_command.add_subparsers(required=True, metavar="ACTION")
    create = keys_commands.add_parser("create", help="Create a key for TENANT: print it once, store only its hash.")
    create.add_argument("tenant")
    create.add_argument("--file", help="keys file (default RAGQ_API_KEYS_FILE, else RAGQ_DATA_DIR/api-keys)")
    create.set_defaults(func=cmd_keys_create)
    return parser


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment with command-line overrides applied."""
    settings = Settings.from_env()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(settings, **overrides) if overrides else settings


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.app import create_app
    from worker.corpus import load_documents
    from worker.model_check import check_model

    settings = load_settings(worker_model=args.model)
    spec = settings.worker_spec
    # Check cheaply here, once, what every pool process would otherwise fail on one after another.
    load_documents(settings.documents, settings.data_dir)
    problem = check_model(spec)
    if problem and not settings.fallback_tiny_model:
        print(f"ragq: model {spec.name} ({spec.source}) cannot be loaded: {problem}", file=sys.stderr)
        return 2
    app = create_app(settings)
    node = "".join(c if c.isalnum() or c in "-_." else "-" for c in spec.name)
    # Gossip and mingle only cost messages here: workers never coordinate with each other.
    app.worker_main(
        ["worker", f"--loglevel={args.loglevel}", f"--hostname=ragq-{node}-{os.getpid()}@%h", "--without-gossip", "--without-mingle"]
    )
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from api.server import run

    settings = load_settings(host=args.host, port=args.port)
    run(settings, processes=args.processes)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"question": args.question}
    for name in ("course", "model", "top_k"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    url = args.url.rstrip("/")
    try:
        headers = auth_headers()
        response = requests.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=30)
        if response.status_code != 202:
            return _print_error(response)
        job = response.json()
        deadline = time.monotonic() + args.timeout
        while job["status"] in ("queued", "running") and time.monotonic() < deadline:
            wait_s = max(1, min(MAX_WAIT_S, int(deadline - time.monotonic())))
            response = requests.get(f"{url}/v1/jobs/{job['id']}", params={"wait": wait_s}, headers=headers, timeout=wait_s + 30)
            if response.status_code != 200:
                return _print_error(response)
            job = response.json()
    except requests.RequestException as exc:
        print(f"ragq: cannot reach {url}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        _print_job(job)
    if job["status"] != "succeeded":
        if job["status"] in ("queued", "running"):
            print(f"ragq: no answer within {args.timeout:g} s; job {job['id']} is {job['status']}", file=sys.stderr)
        return 1
    return 0


def _print_error(response: requests.Response) -> int:
    try:
        error = response.json()["error"]
        message = f"{error['type']}: {error['message']}"
        if error.get("details"):
            message += f" {json.dumps(error['details'])}"
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    print(f"ragq: HTTP {response.status_code}: {message}", file=sys.stderr)
    return 2


def _print_job(job: dict[str, Any]) -> None:
    if job["status"] == "succeeded":
        print(job["answer"])
    else:
        error = job.get("error") or {}
        print(f"job {job['id']} {job['status']}: {error.get('message', '')}".rstrip(": "))
    if job.get("sources"):
        print("\nSources:")
        for rank, source in enumerate(job["sources"], 1):
            print(f"  {rank}. [{source['id']}] {source['course']} / {source['section']} / {source['question']}")
    print(f"\nmodel: {job.get('served_by') or job['model']}  job: {job['id']}")


def cmd_keys_create(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shared.api_keys import add_key

    settings = Settings.from_env()
    path = Path(args.file) if args.file else settings.api_keys_file or settings.data_dir / "api-keys"
    key = add_key(path, args.tenant)
    print(key)
    print(f"ragq: key for tenant {args.tenant!r} created; only its SHA-256 is in {path}. It is not shown again.", file=sys.stderr)
    if settings.api_keys_file is None or Path(settings.api_keys_file) != path:
        print(f"ragq: serve with RAGQ_API_KEYS_FILE={path}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from shared.supervisor import Supervisor

    settings = load_settings(host=args.host, port=args.port)
    if not args.no_fallback:
        settings = dataclasses.replace(settings, fallback_tiny_model=True)
    if args.workers < 1:
        print("ragq: --workers must be at least 1", file=sys.stderr)
        return 2
    return Supervisor(settings, workers=args.workers).run()


if __name__ == "__main__":
    sys.exit(main())
