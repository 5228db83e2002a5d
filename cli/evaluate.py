"""`ragq eval FILE`: run a question CSV as a batch and report retrieval hit rate and MRR."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cli.batch import CONTENT_TYPES, batch_options, report_ended, submit_batch, wait_with_progress
from cli.client import ApiClient, add_url_option, handles_api_errors
from shared.batches import BatchStatus
from shared.jobs import JobStatus

EVAL_COLUMNS = ("question", "course", "document")


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
        if result is None or result.get("status") != JobStatus.SUCCEEDED:
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


@handles_api_errors
def cmd_eval(args: argparse.Namespace) -> int:
    """`ragq eval FILE`: run a question CSV as a batch and report retrieval hit rate and MRR."""
    try:
        rows = read_questions(Path(args.file))
    except (OSError, ValueError) as exc:
        print(f"ragq: {exc}", file=sys.stderr)
        return 2
    data = build_eval_batch(rows, args.top_k)
    client = ApiClient(args.url)
    batch, replayed = submit_batch(client, data, CONTENT_TYPES[".jsonl"], batch_options(model=args.model))
    print(f"ragq: batch {batch['id']}" + (" (already submitted)" if replayed else ""), file=sys.stderr)
    final = wait_with_progress(client, batch)
    if final is None:
        return 130
    report_ended(final)
    try:
        with client.stream_lines(f"/v1/batches/{final['id']}/results") as lines:
            results = [json.loads(line) for line in lines]
    except json.JSONDecodeError as exc:
        print(f"ragq: batch {final['id']}: a results line is not JSON: {exc}", file=sys.stderr)
        return 2
    metrics = retrieval_metrics(rows, results)
    if args.json:
        print(json.dumps({"batch_id": final["id"], **metrics}))
    else:
        print(format_metrics(metrics))
    return 0 if final["status"] == BatchStatus.COMPLETED and metrics["failed"] == 0 else 1


def add_eval_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `eval` to the `ragq` command's subparsers."""
    evaluate = commands.add_parser(
        "eval", help="Run a CSV of question,course,document as a batch; report retrieval hit rate and MRR."
    )
    evaluate.add_argument("file")
    evaluate.add_argument("--model")
    evaluate.add_argument("--top-k", type=int)
    add_url_option(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print the metrics as a JSON object")
    evaluate.set_defaults(func=cmd_eval)
