"""The `ragq` command: serve (everything on one machine), worker, api, ask, batch, eval, status, keys.

`ragq worker` and `ragq api` hand over to `python -m worker` / `python -m api` (exec, same process), so the
command line itself imports neither the worker (torch) nor the API.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cli.ask import add_ask_command
from cli.batch import add_batch_commands
from cli.evaluate import add_eval_command
from cli.status import add_status_command
from shared.config import Settings
from shared.errors import RagqError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named in `argv` (default: the process's arguments); returns the exit code."""
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
    """The `ragq` parser with every command."""
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

    add_ask_command(commands)
    add_batch_commands(commands)
    add_eval_command(commands)
    add_status_command(commands)

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


def exec_module(module: str, *args: str) -> int:
    """Become `python -m MODULE ARGS` (the same pid, so signals and the exit code pass straight through)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *args])
    return 0  # not reached: execv returns only by raising


def cmd_worker(args: argparse.Namespace) -> int:
    """`ragq worker`: become `python -m worker` with the same options."""
    model = ["--model", args.model] if args.model is not None else []
    return exec_module("worker", *model, "--loglevel", args.loglevel)


def cmd_api(args: argparse.Namespace) -> int:
    """`ragq api`: become `python -m api` with the same options."""
    options = [
        *(["--host", args.host] if args.host is not None else []),
        *(["--port", str(args.port)] if args.port is not None else []),
    ]
    return exec_module("api", *options, "--processes", str(args.processes))


def cmd_keys_create(args: argparse.Namespace) -> int:
    """`ragq keys create TENANT`: print a new key once; only its hash goes into the keys file."""
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
    """`ragq serve`: Redis, workers and the API on this machine until Ctrl-C or SIGTERM."""
    from cli.serve import Supervisor

    settings = load_settings(host=args.host, port=args.port)
    if not args.no_fallback:
        settings = dataclasses.replace(settings, fallback_tiny_model=True)
    if args.workers < 1:
        print("ragq: --workers must be at least 1", file=sys.stderr)
        return 2
    return Supervisor(settings, workers=args.workers).run()


if __name__ == "__main__":
    sys.exit(main())
