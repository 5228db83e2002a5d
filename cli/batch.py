"""`ragq batch submit|status|results|cancel|list|retry`: the client side of the batch API (`/v1/batches`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cli.client import ApiClient, ApiError, add_url_option, handles_api_errors
from cli.progress import COUNTED_STATUSES, ProgressBar, batch_exit_code, format_batch, format_batch_table, format_counts
from shared.batches import ENDED

CONTENT_TYPES = {
    ".jsonl": "application/x-ndjson",
    ".ndjson": "application/x-ndjson",
    ".csv": "text/csv",
    ".json": "application/json",
}
POLL_INTERVAL_S = 1.0
# A multi-hour wait should survive an API restart or a Redis hiccup (503), not die on the first one.
POLL_OUTAGE_S = 60.0


def content_type_for(path: Path) -> str | None:
    """The Content-Type to upload a batch file with, by its extension; None for an unknown one."""
    return CONTENT_TYPES.get(path.suffix.lower())


def batch_options(
    model: str | None = None,
    completion_window: str | None = None,
    metadata: str | None = None,
    callback_url: str | None = None,
) -> dict[str, str]:
    """The query parameters of a batch submission, unset ones left out; raises ValueError for bad metadata."""
    options: dict[str, str] = {}
    if model is not None:
        options["model"] = model
    if completion_window is not None:
        options["completion_window"] = completion_window
    if metadata is not None:
        try:
            parsed = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--metadata is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ValueError("--metadata must be a JSON object")
        # Canonical form, so that the same metadata written differently gives the same idempotency key.
        options["metadata"] = json.dumps(parsed, sort_keys=True, separators=(",", ":"))
    if callback_url is not None:
        options["callback_url"] = callback_url
    return options


def idempotency_key(data: bytes, options: Mapping[str, Any]) -> str:
    """A sha256 hex key from the file's bytes and the batch options, so a re-run submits nothing new."""
    # Hashing the file first keeps the two parts apart: no file can be mistaken for a different file plus options.
    canonical = json.dumps(
        {"file_sha256": hashlib.sha256(data).hexdigest(), "options": dict(options)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Calls and waiting.


def submit_batch(
    client: ApiClient, data: bytes, content_type: str, options: Mapping[str, str]
) -> tuple[dict[str, Any], bool]:
    """POST the batch with its idempotency key; returns the batch and whether it was an earlier submission."""
    response = client.request(
        "POST",
        "/v1/batches",
        expected=(200, 202),
        params=dict(options),
        data=data,
        headers={"Content-Type": content_type, "Idempotency-Key": idempotency_key(data, options)},
    )
    replayed = response.headers.get("Idempotent-Replayed", "").lower() == "true"
    return response.json(), replayed


def get_batch(client: ApiClient, batch_id: str) -> dict[str, Any]:
    """The batch object."""
    return dict(client.get_json(f"/v1/batches/{batch_id}"))


def _poll_batch(client: ApiClient, batch_id: str) -> dict[str, Any] | None:
    """The batch object, or None when the API is briefly unreachable or unavailable."""
    try:
        return get_batch(client, batch_id)
    except ApiError as exc:
        if exc.transient:
            return None
        raise


def wait_for_batch(client: ApiClient, batch: dict[str, Any], progress: ProgressBar) -> dict[str, Any]:
    """Poll the batch every second, showing progress, until it has ended; returns its final state."""
    last_seen_at = time.monotonic()
    while True:
        ended = batch["status"] in ENDED
        progress.update(batch.get("request_counts") or {}, time.monotonic(), final=ended)
        if ended:
            return batch
        time.sleep(POLL_INTERVAL_S)
        polled = _poll_batch(client, batch["id"])
        if polled is not None:
            batch, last_seen_at = polled, time.monotonic()
        elif time.monotonic() - last_seen_at > POLL_OUTAGE_S:
            # One last try, letting its error (unreachable, or the HTTP error body) reach the user.
            batch, last_seen_at = get_batch(client, batch["id"]), time.monotonic()


def wait_with_progress(client: ApiClient, batch: dict[str, Any]) -> dict[str, Any] | None:
    """Wait with a progress bar on stderr; None if the user pressed Ctrl-C (the batch keeps running)."""
    progress = ProgressBar(sys.stderr)
    try:
        final: dict[str, Any] | None = wait_for_batch(client, batch, progress)
    except KeyboardInterrupt:
        final = None
    finally:
        progress.close()
    if final is None:
        print(
            f"ragq: stopped waiting; batch {batch['id']} keeps running (see `ragq batch status {batch['id']}`)",
            file=sys.stderr,
        )
    return final


def report_ended(batch: Mapping[str, Any]) -> None:
    """One line on stderr: the batch's final status and counts."""
    counts = batch.get("request_counts") or {}
    print(f"batch {batch['id']} {batch['status']}: {format_counts(counts)}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Commands.


@handles_api_errors
def cmd_batch_submit(args: argparse.Namespace) -> int:
    """`ragq batch submit FILE`: upload a batch file (once), optionally wait for it."""
    path = Path(args.file)
    content_type = content_type_for(path)
    if content_type is None:
        print(f"ragq: {path}: unknown file type; use .jsonl, .ndjson, .csv or .json", file=sys.stderr)
        return 2
    try:
        data = path.read_bytes()
        options = batch_options(args.model, args.completion_window, args.metadata, args.callback_url)
    except (OSError, ValueError) as exc:
        print(f"ragq: {exc}", file=sys.stderr)
        return 2
    client = ApiClient(args.url)
    batch, replayed = submit_batch(client, data, content_type, options)
    # The id alone on stdout, so that `id=$(ragq batch submit FILE)` works; the note goes to stderr.
    print(batch["id"], flush=True)
    if replayed:
        print(f"ragq: already submitted: batch {batch['id']} is {batch['status']}", file=sys.stderr)
    if not args.wait:
        return 0
    final = wait_with_progress(client, batch)
    if final is None:
        return 130
    report_ended(final)
    return batch_exit_code(final)


@handles_api_errors
def cmd_batch_status(args: argparse.Namespace) -> int:
    """`ragq batch status ID`: the batch's key fields and counts."""
    batch = get_batch(ApiClient(args.url), args.batch_id)
    print(json.dumps(batch, indent=2) if args.json else format_batch(batch))
    return 0


@handles_api_errors
def cmd_batch_results(args: argparse.Namespace) -> int:
    """`ragq batch results ID`: stream the results JSONL, bytes unchanged, to a file or stdout."""
    params = {"status": args.status} if args.status else None
    with ApiClient(args.url).stream_lines(f"/v1/batches/{args.batch_id}/results", params) as lines:
        # Opened only now, so that a refused request leaves an existing file as it was.
        out = open(args.output, "wb") if args.output else sys.stdout.buffer
        try:
            for line in lines:
                out.write(line + b"\n")
        finally:
            if args.output:
                out.close()
            else:
                out.flush()
    return 0


@handles_api_errors
def cmd_batch_cancel(args: argparse.Namespace) -> int:
    """`ragq batch cancel ID`: ask the batch to stop; prints its resulting status."""
    batch = ApiClient(args.url).request("POST", f"/v1/batches/{args.batch_id}/cancel", expected=(200, 202)).json()
    print(f"{batch['id']} {batch['status']}")
    return 0


@handles_api_errors
def cmd_batch_list(args: argparse.Namespace) -> int:
    """`ragq batch list`: the newest batches, one line each."""
    params: dict[str, Any] = {"limit": args.limit}
    if args.after:
        params["after"] = args.after
    page = ApiClient(args.url).get_json("/v1/batches", params=params)
    for line in format_batch_table(page["data"]):
        print(line)
    if page.get("has_more") and page["data"]:
        print(f"ragq: more with --after {page['data'][-1]['id']}", file=sys.stderr)
    return 0


@handles_api_errors
def cmd_batch_retry(args: argparse.Namespace) -> int:
    """`ragq batch retry ID`: a new batch of the batch's failed and expired items; prints the new batch's id."""
    params = {"error_type": args.error_type} if args.error_type else None
    batch = ApiClient(args.url).request("POST", f"/v1/batches/{args.batch_id}/retry", params=params, expected=(202,)).json()
    print(f"{batch['id']} retries {batch['retry_of']}: {batch['request_counts']['total']} item(s)")
    return 0


def add_batch_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `batch` (submit, status, results, cancel, list, retry) to the `ragq` command's subparsers."""
    batch = commands.add_parser("batch", help="Submit and follow batches of questions.")
    batch_commands = batch.add_subparsers(required=True, metavar="BATCH_COMMAND")

    submit = batch_commands.add_parser(
        "submit", help="Upload a .jsonl/.ndjson, .csv or .json file as a batch (re-running it submits nothing new)."
    )
    submit.add_argument("file")
    submit.add_argument("--model")
    submit.add_argument("--completion-window", help="e.g. 24h, 30m, 90s")
    submit.add_argument("--metadata", help="a JSON object kept with the batch")
    submit.add_argument("--callback-url", help="called when the batch ends")
    submit.add_argument("--wait", action="store_true", help="show progress until the batch ends")
    add_url_option(submit)
    submit.set_defaults(func=cmd_batch_submit)

    status = batch_commands.add_parser("status", help="Print a batch's state and request counts.")
    status.add_argument("batch_id", metavar="ID")
    status.add_argument("--json", action="store_true", help="print the whole batch object as JSON")
    add_url_option(status)
    status.set_defaults(func=cmd_batch_status)

    results = batch_commands.add_parser("results", help="Write a batch's results as JSONL, in input order.")
    results.add_argument("batch_id", metavar="ID")
    results.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    results.add_argument(
        "--status", choices=[str(status) for status in COUNTED_STATUSES], help="only the items in this state"
    )
    add_url_option(results)
    results.set_defaults(func=cmd_batch_results)

    cancel = batch_commands.add_parser("cancel", help="Cancel a batch's unfinished items.")
    cancel.add_argument("batch_id", metavar="ID")
    add_url_option(cancel)
    cancel.set_defaults(func=cmd_batch_cancel)

    retry = batch_commands.add_parser("retry", help="Submit a batch's failed and expired items again, as a new batch.")
    retry.add_argument("batch_id", metavar="ID")
    retry.add_argument("--error-type", action="append", metavar="TYPE", help="only items with this error type (repeatable; `expired` for expired ones)")
    add_url_option(retry)
    retry.set_defaults(func=cmd_batch_retry)

    listing = batch_commands.add_parser("list", help="List batches, newest first.")
    listing.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    listing.add_argument("--after", metavar="ID", help="start after this batch (the next page)")
    add_url_option(listing)
    listing.set_defaults(func=cmd_batch_list)
