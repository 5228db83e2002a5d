"""`ragq eval FILE [--retrieval MODES]`: run a question CSV as one batch per retrieval mode; report retrieval hit
rate and MRR per mode (a comparison table for several), and with an `answer` column the mean cosine similarity
of the generated answers to those references (scored by the worker with its embedding model)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cli.batch import CONTENT_TYPES, report_ended, submit_batch, wait_with_progress
from cli.client import ApiClient, add_url_option, handles_api_errors
from shared.batches import BatchStatus
from shared.config import RETRIEVAL_MODES
from shared.evaluation import reciprocal_rank
from shared.jobs import JobStatus

EVAL_COLUMNS = ("question", "course", "document")
ANSWER_COLUMN = "answer"


def read_questions(path: Path) -> list[dict[str, str]]:
    """The rows of an evaluation CSV with columns question, course, document (and optionally answer); raises
    ValueError if malformed."""
    # utf-8-sig: spreadsheets often save a byte-order mark that would otherwise stick to the first column's name.
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        fields = reader.fieldnames or []
        missing = [name for name in EVAL_COLUMNS if name not in fields]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(EVAL_COLUMNS)}")
        names = EVAL_COLUMNS + ((ANSWER_COLUMN,) if ANSWER_COLUMN in fields else ())
        rows = [{name: (row[name] or "").strip() for name in names} for row in reader]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def parse_modes(raw: Sequence[str] | None) -> list[str | None]:
    """`--retrieval text,vector --retrieval hybrid` -> the modes in order; none given -> [None] (the server's default)."""
    if not raw:
        return [None]
    modes: list[str | None] = []
    for part in ",".join(raw).split(","):
        mode = part.strip()
        if mode not in RETRIEVAL_MODES:
            raise ValueError(f"unknown retrieval mode {mode!r}; choose from {', '.join(RETRIEVAL_MODES)}")
        if mode not in modes:
            modes.append(mode)
    return modes


def build_eval_batch(rows: Sequence[Mapping[str, str]], top_k: int | None = None, evaluate: bool = False) -> bytes:
    """The JSONL batch for evaluation rows; custom_id is the row number, starting at 1. With `evaluate`, each
    line carries its expected document and reference answer, and the worker scores it."""
    lines = []
    for number, row in enumerate(rows, 1):
        item: dict[str, Any] = {"custom_id": str(number), "question": row["question"], "course": row["course"]}
        if top_k is not None:
            item["top_k"] = top_k
        if evaluate:
            item["expected_document"] = row["document"]
            if row.get(ANSWER_COLUMN):
                item["reference_answer"] = row[ANSWER_COLUMN]
        lines.append(json.dumps(item))
    return "\n".join(lines).encode("utf-8")


def eval_options(
    model: str | None, retrieval: str | None, evaluate: bool, max_new_tokens: int | None
) -> dict[str, str]:
    """The batch-wide options of an evaluation batch, as query parameters (the JSONL body then streams)."""
    options: dict[str, str] = {}
    if model:
        options["model"] = model
    if retrieval is not None:
        options["retrieval"] = retrieval
    if evaluate:
        options["evaluate"] = "true"
    if max_new_tokens is not None:
        options["params"] = json.dumps({"max_new_tokens": max_new_tokens})
    return options


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
        rank = reciprocal_rank(row["document"], [source.get("id") for source in result.get("sources") or []])
        hits += rank > 0
        reciprocal_ranks += rank
    return {
        "hit_rate": hits / n if n else 0.0,
        "mrr": reciprocal_ranks / n if n else 0.0,
        "n": n,
        "failed": len(rows) - n,
    }


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """`hit_rate 0.8813  mrr 0.7788  n 674  failed 0` (and `answer_similarity 0.6512` when scored)."""
    line = f"hit_rate {metrics['hit_rate']:.4f}  mrr {metrics['mrr']:.4f}  n {metrics['n']}  failed {metrics['failed']}"
    if metrics.get("answer_similarity") is not None:
        line += f"  answer_similarity {metrics['answer_similarity']:.4f}"
    return line


def format_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """One row per retrieval mode."""
    with_answers = any(run.get("answer_similarity") is not None for run in runs)
    header = f"{'retrieval':<10} {'hit_rate':>8} {'mrr':>8} {'n':>6} {'failed':>6}" + ("  answer_similarity" if with_answers else "")
    lines = [header]
    for run in runs:
        line = f"{run['retrieval'] or 'default':<10} {run['hit_rate']:>8.4f} {run['mrr']:>8.4f} {run['n']:>6} {run['failed']:>6}"
        if with_answers:
            similarity = run.get("answer_similarity")
            line += f"  {similarity:.4f}" if similarity is not None else "  -"
        lines.append(line)
    return "\n".join(lines)


def run_mode(client: ApiClient, rows: Sequence[Mapping[str, str]], args: argparse.Namespace, mode: str | None) -> tuple[dict[str, Any], bool] | None:
    """One batch for `mode`: its figures and whether it completed; None when the user stopped waiting."""
    with_answers = any(row.get(ANSWER_COLUMN) for row in rows)
    data = build_eval_batch(rows, args.top_k, evaluate=with_answers)
    options = eval_options(args.model, mode, with_answers, args.max_new_tokens)
    batch, replayed = submit_batch(client, data, CONTENT_TYPES[".jsonl"], options)
    label = f" ({mode})" if mode else ""
    print(f"ragq: batch {batch['id']}{label}" + (" (already submitted)" if replayed else ""), file=sys.stderr)
    final = wait_with_progress(client, batch)
    if final is None:
        return None
    report_ended(final)
    with client.stream_lines(f"/v1/batches/{final['id']}/results") as lines:
        results = [json.loads(line) for line in lines]
    figures: dict[str, Any] = {"batch_id": final["id"], "retrieval": mode, **retrieval_metrics(rows, results)}
    if with_answers:
        evaluation = final.get("evaluation") or client.get_json(f"/v1/batches/{final['id']}").get("evaluation") or {}
        figures["answer_similarity"] = evaluation.get("answer_similarity")
        figures["answer_n"] = evaluation.get("answer_n", 0)
    return figures, final["status"] == BatchStatus.COMPLETED and figures["failed"] == 0


@handles_api_errors
def cmd_eval(args: argparse.Namespace) -> int:
    """`ragq eval FILE`: run a question CSV as a batch per retrieval mode and report the figures."""
    try:
        rows = read_questions(Path(args.file))
        modes = parse_modes(args.retrieval)
    except (OSError, ValueError) as exc:
        print(f"ragq: {exc}", file=sys.stderr)
        return 2
    client = ApiClient(args.url)
    runs = []
    all_ok = True
    for mode in modes:
        try:
            outcome = run_mode(client, rows, args, mode)
        except json.JSONDecodeError as exc:
            print(f"ragq: a results line is not JSON: {exc}", file=sys.stderr)
            return 2
        if outcome is None:
            return 130
        figures, ok = outcome
        runs.append(figures)
        all_ok = all_ok and ok
    if args.json:
        print(json.dumps(runs[0] if len(runs) == 1 else {"runs": runs}))
    elif len(runs) == 1:
        print(format_metrics(runs[0]))
    else:
        print(format_table(runs))
    return 0 if all_ok else 1


def add_eval_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `eval` to the `ragq` command's subparsers."""
    evaluate = commands.add_parser(
        "eval",
        help="Run a CSV of question,course,document[,answer] as a batch per retrieval mode; report hit rate and MRR "
        "(and answer similarity with an answer column).",
    )
    evaluate.add_argument("file")
    evaluate.add_argument("--model")
    evaluate.add_argument("--top-k", type=int)
    evaluate.add_argument(
        "--max-new-tokens", type=int, help="cap the answers' length (retrieval figures do not depend on it; answer similarity does)"
    )
    evaluate.add_argument(
        "--retrieval",
        action="append",
        metavar="MODES",
        help=f"retrieval mode(s), comma-separated or repeated: {', '.join(RETRIEVAL_MODES)} (default: the server's)",
    )
    add_url_option(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print the figures as JSON (several modes: {\"runs\": [...]})")
    evaluate.set_defaults(func=cmd_eval)
