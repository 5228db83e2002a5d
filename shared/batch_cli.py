"""The `ragq batch ...` and `ragq eval` commands: the client side of the batch API (`/v1/batches`)."""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import requests

from shared.config import Settings

# Request counts that say an item has ended; together they are the "done" of the progress bar.
DONE_COUNTS = ("succeeded", "failed", "cancelled", "expired")
ENDED_STATUSES = frozenset({"completed", "cancelled", "expired", "failed"})
RESULT_STATUSES = ("succeeded", "failed", "cancelled", "expired", "queued", "running")
CONTENT_TYPES = {
    ".jsonl": "application/x-ndjson",
    ".ndjson": "application/x-ndjson",
    ".csv": "text/csv",
    ".json": "application/json",
}
EVAL_COLUMNS = ("question", "course", "document")

HTTP_TIMEOUT_S = 30
POLL_INTERVAL_S = 1.0
# A multi-hour wait should survive an API restart or a Redis hiccup (503), not die on the first one.
POLL_OUTAGE_S = 60.0
TRANSIENT_STATUSES = frozenset({502, 503, 504})
# Long enough to smooth the bursts in which batched generation finishes items, short enough to follow changes.
RATE_WINDOW_S = 30.0
PLAIN_PROGRESS_INTERVAL_S = 10.0
PROGRESS_BAR_WIDTH = 24
RESULTS_CHUNK_BYTES = 64 * 1024


class ApiError(Exception):
    """The API answered with a status the command did not expect."""

    def __init__(self, response: requests.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


# ---------------------------------------------------------------------------------------------------------------
# Pure parts: options, keys, formatting, metrics.


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


def done_count(counts: Mapping[str, int]) -> int:
    """Items that have ended, whichever way: succeeded, failed, cancelled or expired."""
    return sum(int(counts.get(name) or 0) for name in DONE_COUNTS)


def format_duration(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour up."""
    total_s = max(0, int(round(seconds)))
    hours, rest = divmod(total_s, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_progress(done: int, total: int, rate: float | None, eta_s: float | None) -> str:
    """One progress line: bar, done/total, percentage, items per second and ETA (`--` when unknown)."""
    fraction = min(1.0, done / total) if total > 0 else 0.0
    filled = int(fraction * PROGRESS_BAR_WIDTH)
    bar = "#" * filled + "." * (PROGRESS_BAR_WIDTH - filled)
    rate_text = f"{rate:.1f}/s" if rate is not None else "--/s"
    eta_text = format_duration(eta_s) if eta_s is not None else "--"
    width = len(str(total))
    return f"[{bar}] {done:>{width}}/{total} {fraction * 100:5.1f}%  {rate_text}  ETA {eta_text}"


class RateMeter:
    """Items per second over the last `window_s` seconds of (time, done) samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> float | None:
        """Record a sample and return the recent rate; None until two samples span some time."""
        self.samples.append((now, done))
        # Keep the newest sample at or before the window's start, so the rate always spans the whole window.
        while len(self.samples) >= 2 and self.samples[1][0] <= now - self.window_s:
            self.samples.popleft()
        first_t, first_done = self.samples[0]
        elapsed_s = now - first_t
        if elapsed_s <= 0:
            return None
        return max(0.0, (done - first_done) / elapsed_s)


def eta_seconds(done: int, total: int, rate: float | None) -> float | None:
    """Seconds left at the current rate; None when the rate is unknown or zero."""
    if not rate or rate <= 0:
        return None
    return max(0, total - done) / rate


class ProgressBar:
    """Batch progress on a stream: redrawn in place on a terminal, one plain line every ~10 s otherwise."""

    def __init__(
        self,
        stream: TextIO,
        *,
        in_place: bool | None = None,
        plain_interval_s: float = PLAIN_PROGRESS_INTERVAL_S,
        window_s: float = RATE_WINDOW_S,
    ) -> None:
        self.stream = stream
        self.in_place = stream.isatty() if in_place is None else in_place
        self.plain_interval_s = plain_interval_s
        self.meter = RateMeter(window_s)
        self._last_plain_at: float | None = None
        self._drawn_chars = 0

    def update(self, counts: Mapping[str, int], now: float, *, final: bool = False) -> None:
        """Show the batch's request counts at time `now`; `final` forces a plain line out."""
        done, total = done_count(counts), int(counts.get("total") or 0)
        rate = self.meter.add(now, done)
        line = format_progress(done, total, rate, eta_seconds(done, total, rate))
        if self.in_place:
            # Pad with spaces to wipe what is left of a longer previous line.
            self.stream.write("\r" + line.ljust(self._drawn_chars))
            self._drawn_chars = len(line)
        elif final or self._last_plain_at is None or now - self._last_plain_at >= self.plain_interval_s:
            self.stream.write(line + "\n")
            self._last_plain_at = now
        self.stream.flush()

    def close(self) -> None:
        """End the line being redrawn, so what follows starts on a line of its own."""
        if self.in_place and self._drawn_chars:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn_chars = 0


def batch_exit_code(batch: Mapping[str, Any]) -> int:
    """0 if the batch completed and every item succeeded, else 1."""
    counts = batch.get("request_counts") or {}
    unsuccessful = sum(int(counts.get(name) or 0) for name in ("failed", "cancelled", "expired"))
    return 0 if batch.get("status") == "completed" and unsuccessful == 0 else 1


def format_counts(counts: Mapping[str, int]) -> str:
    """`succeeded 3  failed 1  ...` for every count but the total."""
    names = ("succeeded", "failed", "cancelled", "expired", "queued", "running")
    return "  ".join(f"{name} {int(counts.get(name) or 0)}" for name in names)


def format_batch(batch: Mapping[str, Any]) -> str:
    """The batch object's key fields and counts, one `name  value` line each; unset timestamps left out."""
    counts = batch.get("request_counts") or {}
    done, total = done_count(counts), int(counts.get("total") or 0)
    percent = f" ({done / total * 100:.1f}%)" if total else ""
    fields: list[tuple[str, Any]] = [
        ("id", batch.get("id")),
        ("status", batch.get("status")),
        ("model", batch.get("model")),
        ("progress", f"{done}/{total} done{percent}"),
        ("requests", format_counts(counts)),
        ("completion_window", batch.get("completion_window")),
    ]
    for name in ("created_at", "in_progress_at", "completed_at", "cancelled_at", "expires_at"):
        if batch.get(name):
            fields.append((name, batch[name]))
    if batch.get("metadata"):
        fields.append(("metadata", json.dumps(batch["metadata"])))
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name:<{width}}  {'-' if value is None else value}" for name, value in fields)


def format_batch_table(batches: Sequence[Mapping[str, Any]]) -> list[str]:
    """One aligned line per batch: id, status, done/total, created_at, model."""
    rows = []
    for batch in batches:
        counts = batch.get("request_counts") or {}
        rows.append(
            [
                str(batch.get("id")),
                str(batch.get("status")),
                f"{done_count(counts)}/{int(counts.get('total') or 0)}",
                str(batch.get("created_at") or "-"),
                str(batch.get("model") or "-"),
            ]
        )
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def read_questions(path: Path) -> list[dict[str, str]]:
    """The rows of an evaluation CSV with columns question, course, document; raises ValueError if malformed."""
    # utf-8-sig: spreadsheets often save a byte-order mark that would otherwise stick to the first column's name.
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        missing = [name for name in EVAL_COLUMNS if name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(EVAL_COLUMNS)}")
        rows = [{name: (row[name] or "").strip() for name in EVAL_COLUMNS} for row in reader]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def build_eval_batch(rows: Sequence[Mapping[str, str]], top_k: int | None = None) -> bytes:
    """The JSONL batch for evaluation rows; custom_id is the row number, starting at 1."""
    lines = []
    for number, row in enumerate(rows, 1):
        item: dict[str, Any] = {"custom_id": str(number), "question": row["question"], "course": row["course"]}
        if top_k is not None:
            item["top_k"] = top_k
        lines.append(json.dumps(item))
    return ("\n".join(lines) + "\n").encode("utf-8")


def retrieval_metrics(rows: Sequence[Mapping[str, str]], results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Hit rate and MRR of each row's document among its result's sources, over rows whose job succeeded.

    Row N (from 1) is matched to the result with custom_id "N". `failed` counts the rows without a succeeded result
    (failed, cancelled, expired or missing), so n + failed is the number of rows.
    """
    by_custom_id = {str(result.get("custom_id")): result for result in results}
    hits = 0
    reciprocal_ranks = 0.0
    n = 0
    for number, row in enumerate(rows, 1):
        result = by_custom_id.get(str(number))
        if result is None or result.get("status") != "succeeded":
            continue
        n += 1
        source_ids = [source.get("id") for source in result.get("sources") or []]
        if row["document"] in source_ids:
            hits += 1
            reciprocal_ranks += 1.0 / (source_ids.index(row["document"]) + 1)
    return {
        "hit_rate": hits / n if n else 0.0,
        "mrr": reciprocal_ranks / n if n else 0.0,
        "n": n,
        "failed": len(rows) - n,
    }


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """`hit_rate 0.8813  mrr 0.7788  n 674  failed 0`."""
    return f"hit_rate {metrics['hit_rate']:.4f}  mrr {metrics['mrr']:.4f}  n {metrics['n']}  failed {metrics['failed']}"


# ---------------------------------------------------------------------------------------------------------------
# HTTP calls.


def auth_headers() -> dict[str, str]:
    """`Authorization: Bearer $RAGQ_API_KEY` when a key is set (the API needs one once keys are configured)."""
    key = Settings.from_env().api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


def _call(method: str, url: str, expected: Sequence[int] = (200,), **kwargs: Any) -> requests.Response:
    kwargs["headers"] = {**auth_headers(), **kwargs.get("headers", {})}
    response = requests.request(method, url, timeout=HTTP_TIMEOUT_S, **kwargs)
    if response.status_code not in expected:
        raise ApiError(response)
    return response


def submit_batch(
    base_url: str, data: bytes, content_type: str, options: Mapping[str, str]
) -> tuple[dict[str, Any], bool]:
    """POST the batch with its idempotency key; returns the batch and whether it was an earlier submission."""
    response = _call(
        "POST",
        f"{base_url}/v1/batches",
        expected=(200, 202),
        params=dict(options),
        data=data,
        headers={"Content-Type": content_type, "Idempotency-Key": idempotency_key(data, options)},
    )
    replayed = response.headers.get("Idempotent-Replayed", "").lower() == "true"
    return response.json(), replayed


def get_batch(base_url: str, batch_id: str) -> dict[str, Any]:
    """The batch object."""
    return _call("GET", f"{base_url}/v1/batches/{batch_id}").json()


def _poll_batch(base_url: str, batch_id: str) -> dict[str, Any] | None:
    """The batch object, or None when the API is briefly unreachable or unavailable."""
    try:
        return get_batch(base_url, batch_id)
    except (requests.ConnectionError, requests.Timeout):
        return None
    except ApiError as exc:
        if exc.response.status_code in TRANSIENT_STATUSES:
            return None
        raise


def wait_for_batch(base_url: str, batch: dict[str, Any], progress: ProgressBar) -> dict[str, Any]:
    """Poll the batch every second, showing progress, until it has ended; returns its final state."""
    last_seen_at = time.monotonic()
    while True:
        ended = batch["status"] in ENDED_STATUSES
        progress.update(batch.get("request_counts") or {}, time.monotonic(), final=ended)
        if ended:
            return batch
        time.sleep(POLL_INTERVAL_S)
        polled = _poll_batch(base_url, batch["id"])
        if polled is not None:
            batch, last_seen_at = polled, time.monotonic()
        elif time.monotonic() - last_seen_at > POLL_OUTAGE_S:
            # One last try, letting its error (unreachable, or the HTTP error body) reach the user.
            batch, last_seen_at = get_batch(base_url, batch["id"]), time.monotonic()


def _wait_with_progress(base_url: str, batch: dict[str, Any]) -> dict[str, Any] | None:
    """Wait with a progress bar on stderr; None if the user pressed Ctrl-C (the batch keeps running)."""
    progress = ProgressBar(sys.stderr)
    try:
        final: dict[str, Any] | None = wait_for_batch(base_url, batch, progress)
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


def _report_submitted(batch: Mapping[str, Any], replayed: bool) -> None:
    # The id alone on stdout, so that `id=$(ragq batch submit FILE)` works; the note goes to stderr.
    print(batch["id"], flush=True)
    if replayed:
        print(f"ragq: already submitted: batch {batch['id']} is {batch['status']}", file=sys.stderr)


def _report_ended(batch: Mapping[str, Any]) -> None:
    counts = batch.get("request_counts") or {}
    print(f"batch {batch['id']} {batch['status']}: {format_counts(counts)}", file=sys.stderr)


def _command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so that a refused request or an unreachable API prints one line and exits 2."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        # Imported here: shared.cli imports this module to build its parser.
        from shared.cli import _print_error

        try:
            return func(args)
        except ApiError as exc:
            return _print_error(exc.response)
        except requests.RequestException as exc:
            print(f"ragq: cannot reach {args.url}: {exc}", file=sys.stderr)
            return 2

    return run


# ---------------------------------------------------------------------------------------------------------------
# Commands.


@_command
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
    url = args.url.rstrip("/")
    batch, replayed = submit_batch(url, data, content_type, options)
    _report_submitted(batch, replayed)
    if not args.wait:
        return 0
    final = _wait_with_progress(url, batch)
    if final is None:
        return 130
    _report_ended(final)
    return batch_exit_code(final)


@_command
def cmd_batch_status(args: argparse.Namespace) -> int:
    """`ragq batch status ID`: the batch's key fields and counts."""
    batch = get_batch(args.url.rstrip("/"), args.batch_id)
    print(json.dumps(batch, indent=2) if args.json else format_batch(batch))
    return 0


@_command
def cmd_batch_results(args: argparse.Namespace) -> int:
    """`ragq batch results ID`: stream the results JSONL, bytes unchanged, to a file or stdout."""
    params = {"status": args.status} if args.status else None
    url = f"{args.url.rstrip('/')}/v1/batches/{args.batch_id}/results"
    with requests.get(url, params=params, headers=auth_headers(), stream=True, timeout=HTTP_TIMEOUT_S) as response:
        if response.status_code != 200:
            raise ApiError(response)
        # Opened only now, so that a refused request leaves an existing file as it was.
        out = open(args.output, "wb") if args.output else sys.stdout.buffer
        try:
            for line in response.iter_lines(chunk_size=RESULTS_CHUNK_BYTES):
                if line:
                    out.write(line + b"\n")
        finally:
            if args.output:
                out.close()
            else:
                out.flush()
    return 0


@_command
def cmd_batch_cancel(args: argparse.Namespace) -> int:
    """`ragq batch cancel ID`: ask the batch to stop; prints its resulting status."""
    batch = _call("POST", f"{args.url.rstrip('/')}/v1/batches/{args.batch_id}/cancel", expected=(200, 202)).json()
    print(f"{batch['id']} {batch['status']}")
    return 0


@_command
def cmd_batch_list(args: argparse.Namespace) -> int:
    """`ragq batch list`: the newest batches, one line each."""
    params: dict[str, Any] = {"limit": args.limit}
    if args.after:
        params["after"] = args.after
    page = _call("GET", f"{args.url.rstrip('/')}/v1/batches", params=params).json()
    for line in format_batch_table(page["data"]):
        print(line)
    if page.get("has_more") and page["data"]:
        print(f"ragq: more with --after {page['data'][-1]['id']}", file=sys.stderr)
    return 0


def fetch_results(base_url: str, batch_id: str) -> list[dict[str, Any]]:
    """Every result line of the batch, parsed."""
    url = f"{base_url}/v1/batches/{batch_id}/results"
    with requests.get(url, headers=auth_headers(), stream=True, timeout=HTTP_TIMEOUT_S) as response:
        if response.status_code != 200:
            raise ApiError(response)
        return [json.loads(line) for line in response.iter_lines(chunk_size=RESULTS_CHUNK_BYTES) if line]


@_command
def cmd_eval(args: argparse.Namespace) -> int:
    """`ragq eval FILE`: run a question CSV as a batch and report retrieval hit rate and MRR."""
    try:
        rows = read_questions(Path(args.file))
    except (OSError, ValueError) as exc:
        print(f"ragq: {exc}", file=sys.stderr)
        return 2
    data = build_eval_batch(rows, args.top_k)
    options = batch_options(model=args.model)
    url = args.url.rstrip("/")
    batch, replayed = submit_batch(url, data, CONTENT_TYPES[".jsonl"], options)
    print(f"ragq: batch {batch['id']}" + (" (already submitted)" if replayed else ""), file=sys.stderr)
    final = _wait_with_progress(url, batch)
    if final is None:
        return 130
    _report_ended(final)
    try:
        results = fetch_results(url, final["id"])
    except json.JSONDecodeError as exc:
        print(f"ragq: batch {final['id']}: a results line is not JSON: {exc}", file=sys.stderr)
        return 2
    metrics = retrieval_metrics(rows, results)
    if args.json:
        print(json.dumps({"batch_id": final["id"], **metrics}))
    else:
        print(format_metrics(metrics))
    return 0 if final["status"] == "completed" and metrics["failed"] == 0 else 1


# ---------------------------------------------------------------------------------------------------------------
# Parser.


def add_batch_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `batch` (submit, status, results, cancel, list) and `eval` to the `ragq` command's subparsers."""
    # Imported here: shared.cli imports this module at its top.
    from shared.cli import DEFAULT_URL

    def add_url(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--url", default=DEFAULT_URL, help=f"the API (default {DEFAULT_URL})")

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
    add_url(submit)
    submit.set_defaults(func=cmd_batch_submit)

    status = batch_commands.add_parser("status", help="Print a batch's state and request counts.")
    status.add_argument("batch_id", metavar="ID")
    status.add_argument("--json", action="store_true", help="print the whole batch object as JSON")
    add_url(status)
    status.set_defaults(func=cmd_batch_status)

    results = batch_commands.add_parser("results", help="Write a batch's results as JSONL, in input order.")
    results.add_argument("batch_id", metavar="ID")
    results.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    results.add_argument("--status", choices=RESULT_STATUSES, help="only the items in this state")
    add_url(results)
    results.set_defaults(func=cmd_batch_results)

    cancel = batch_commands.add_parser("cancel", help="Cancel a batch's unfinished items.")
    cancel.add_argument("batch_id", metavar="ID")
    add_url(cancel)
    cancel.set_defaults(func=cmd_batch_cancel)

    listing = batch_commands.add_parser("list", help="List batches, newest first.")
    listing.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    listing.add_argument("--after", metavar="ID", help="start after this batch (the next page)")
    add_url(listing)
    listing.set_defaults(func=cmd_batch_list)

    evaluate = commands.add_parser(
        "eval", help="Run a CSV of question,course,document as a batch; report retrieval hit rate and MRR."
    )
    evaluate.add_argument("file")
    evaluate.add_argument("--model")
    evaluate.add_argument("--top-k", type=int)
    add_url(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print the metrics as a JSON object")
    evaluate.set_defaults(func=cmd_eval)
