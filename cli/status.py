"""`ragq status`: the operator's picture in the terminal, read from `GET /v1/models` (models, workers, queues,
your batches with progress and ETA, your recent failures)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from cli.client import ApiClient, add_url_option, handles_api_errors
from cli.progress import format_duration, format_progress
from shared.overview import items_per_s

# Failures shown per model (the API returns up to 20; `--json` has them all).
SHOWN_FAILURES = 5
MAX_MESSAGE_CHARS = 120
# Clears the terminal before each `--watch` refresh.
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def fetch(client: ApiClient, model: str | None) -> list[dict[str, Any]]:
    """The models the command shows: every served one, or `model` alone."""
    if model is not None:
        return [client.get_json(f"/v1/models/{model}")]
    return list(client.get_json("/v1/models")["data"])


def format_status(models: Sequence[Mapping[str, Any]], now: float) -> list[str]:
    """The picture as lines: per model a summary line, then its workers, batches and recent failures."""
    lines: list[str] = []
    for model in models:
        lines.extend(format_model(model, now))
    return lines


def format_model(model: Mapping[str, Any], now: float) -> list[str]:
    """One model's lines."""
    workers = model.get("workers") or []
    queues = model.get("queues") or {}
    rate = items_per_s(list(model.get("throughput") or []), now)
    count = f"{len(workers)} worker{'' if len(workers) == 1 else 's'}"
    lines = [
        f"{model['id']}  {count}  queued {queues.get('interactive_queued', 0)}  backlog {queues.get('backlog_pending', 0)}"
        f"  running {queues.get('running', 0)}  last minute {rate:.1f}/s"
    ]
    if not workers:
        lines.append("  no live worker")
    for worker in workers:
        lines.append("  " + format_worker(worker, now))
    for batch in model.get("batches") or []:
        total = int(batch.get("total") or 0)
        done = round(float(batch.get("progress") or 0) * total)
        progress = format_progress(done, total, batch.get("items_per_s"), batch.get("eta_s"))
        lines.append(f"  batch  {batch['id']}  {progress}")
    failures = model.get("recent_failures") or []
    for failure in failures[:SHOWN_FAILURES]:
        lines.append("  " + format_failure(failure))
    if len(failures) > SHOWN_FAILURES:
        lines.append(f"  ... {len(failures) - SHOWN_FAILURES} more failures (--json shows them)")
    return lines


def format_worker(worker: Mapping[str, Any], now: float) -> str:
    """`worker NAME  DEVICE DTYPE  ENGINE  caps SIZE/TOKENS  up H:MM:SS  done N  R/s  [last error TYPE at T]`."""
    up = format_duration(now - float(worker["up_since"])) if worker.get("up_since") else "-"
    text = (
        f"worker {worker.get('name')}  {worker.get('device')} {worker.get('dtype')}  {worker.get('engine')}"
        f"  caps {worker.get('max_batch_size')}/{worker.get('max_batch_tokens')}  up {up}"
        f"  done {worker.get('jobs_done', 0)}  {float(worker.get('items_per_s') or 0):.1f}/s"
    )
    error = worker.get("last_error")
    if error:
        text += f"  last error {error.get('type')} at {clock(error.get('at'))}"
    return text


def format_failure(failure: Mapping[str, Any]) -> str:
    """`failed TIME  TYPE  job ID  [batch ID]: MESSAGE`."""
    message = str(failure.get("message") or "")
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    batch = f"  batch {failure['batch_id']}" if failure.get("batch_id") else ""
    return f"failed {clock(failure.get('at'))}  {failure.get('type')}  job {failure.get('job_id')}{batch}: {message}"


def clock(at: Any) -> str:
    """Unix seconds as UTC `YYYY-MM-DD HH:MM:SS`."""
    if at is None:
        return "-"
    return datetime.fromtimestamp(float(at), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def watch_interval(text: str) -> float:
    """`--watch`'s value: seconds between refreshes, 0.5 to 3600."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.5 <= seconds <= 3600:
        raise argparse.ArgumentTypeError("must be between 0.5 and 3600 seconds")
    return seconds


@handles_api_errors
def cmd_status(args: argparse.Namespace) -> int:
    """`ragq status`: print the picture once, or every `--watch` seconds until Ctrl-C."""
    client = ApiClient(args.url)
    while True:
        models = fetch(client, args.model)
        if args.json:
            document = {"object": "list", "data": models} if args.model is None else models[0]
            output = json.dumps(document, indent=2)
        else:
            output = "\n".join(format_status(models, time.time()))
        if args.watch and sys.stdout.isatty():
            sys.stdout.write(CLEAR_SCREEN)
        print(output, flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def add_status_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `status` to the `ragq` command's subparsers."""
    status = commands.add_parser(
        "status", help="Models, live workers, queues, your batches (progress, ETA) and recent failures."
    )
    status.add_argument("--model", help="show this served model only")
    status.add_argument("--json", action="store_true", help="print the /v1/models document as it is")
    status.add_argument("--watch", type=watch_interval, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    add_url_option(status)
    status.set_defaults(func=cmd_status)
