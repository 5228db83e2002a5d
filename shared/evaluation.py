"""Evaluation figures, the course's offline measures: retrieval hit rate and MRR against the expected FAQ entry,
and the mean cosine similarity of generated answers to reference answers.

Pure functions: the worker scores each item of an evaluated batch as it finishes it (`item_evaluation`), the
batch store sums the scores up once the batch has ended (`summarise`), and `ragq eval` uses `rank_figures` on
results it has read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def reciprocal_rank(expected: str, source_ids: Sequence[str]) -> float:
    """1 / rank of `expected` among `source_ids` (from 1), or 0.0 when it is not among them."""
    return 1.0 / (list(source_ids).index(expected) + 1) if expected in source_ids else 0.0


def item_evaluation(
    expected_document: str | None, source_ids: Sequence[str], answer_similarity: float | None
) -> dict[str, Any]:
    """One item's scores: `hit` and `reciprocal_rank` (None without an expected document), `answer_similarity`."""
    if expected_document is None:
        return {"hit": None, "reciprocal_rank": None, "answer_similarity": answer_similarity}
    rank = reciprocal_rank(expected_document, source_ids)
    return {"hit": rank > 0, "reciprocal_rank": rank, "answer_similarity": answer_similarity}


def summarise(evaluations: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """The batch's figures from its succeeded items' scores (None for an item not scored)."""
    hits = ranks = similarity = 0.0
    retrieval_n = answer_n = 0
    for scores in evaluations:
        if not scores:
            continue
        if scores.get("hit") is not None:
            retrieval_n += 1
            hits += bool(scores["hit"])
            ranks += float(scores["reciprocal_rank"])
        if scores.get("answer_similarity") is not None:
            answer_n += 1
            similarity += float(scores["answer_similarity"])
    return {
        "retrieval_n": retrieval_n,
        "hit_rate": hits / retrieval_n if retrieval_n else None,
        "mrr": ranks / retrieval_n if retrieval_n else None,
        "answer_n": answer_n,
        "answer_similarity": similarity / answer_n if answer_n else None,
    }
