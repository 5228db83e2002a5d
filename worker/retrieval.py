"""FAQ retrieval in three modes: `text` (minsearch with the course's settings, exactly), `vector` (cosine
similarity of sentence embeddings) and `hybrid` (the two scores fused).

Hybrid ranks by the question's cosine similarity to an entry plus `HYBRID_TEXT_WEIGHT` times the entry's text
score divided by the best text score of the question's candidates (so the text part is at most the weight, and
a question whose words match nothing keeps its vector ranking). Weight, normalisation and what is embedded were
tuned on the dev questions only (docs/benchmarks.md "Retrieval modes").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import minsearch
import numpy as np
import sklearn
from sklearn.metrics.pairwise import cosine_similarity

from shared.config import RETRIEVAL_MODES
from worker.embeddings import LazyVectorIndex

TEXT_FIELDS = ["question", "text", "section"]
KEYWORD_FIELDS = ["course"]
BOOST = {"question": 3.0, "section": 0.5}
# Dev set, all-MiniLM-L6-v2: 0.15 to 0.25 all beat both inputs on hit rate and MRR; 0.2 is the middle.
HYBRID_TEXT_WEIGHT = 0.2


class Query(NamedTuple):
    """One question's retrieval request."""

    question: str
    course: str | None
    top_k: int
    mode: str = "text"


class Retriever:
    """The corpus's indexes, built once per worker process: minsearch's, and the vector index when given
    (built lazily: see `worker.embeddings.LazyVectorIndex`)."""

    def __init__(self, documents: Sequence[dict[str, Any]], vectors: LazyVectorIndex | None = None) -> None:
        self.documents = list(documents)
        self.index = minsearch.Index(text_fields=TEXT_FIELDS, keyword_fields=KEYWORD_FIELDS)
        self.index.fit(self.documents)
        self.vectors = vectors

    def search(self, question: str, course: str | None, top_k: int) -> list[dict[str, Any]]:
        """The `top_k` best documents in rank order, filtered on `course` when given (minsearch itself)."""
        filter_dict = {"course": course} if course else {}
        return self.index.search(query=question, filter_dict=filter_dict, boost_dict=BOOST, num_results=top_k)

    def search_many(self, queries: Sequence[tuple[str, str | None, int]]) -> list[list[dict[str, Any]]]:
        """Text `search` for many (question, course, top_k) at once."""
        results = self.retrieve([Query(q, c, k) for q, c, k in queries])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results  # type: ignore[return-value]

    def retrieve(self, queries: Sequence[Query]) -> list[list[dict[str, Any]] | Exception]:
        """Each query's documents in rank order, by its mode; one pass for all of them: one sparse product per
        text field, one encode call for the questions that need embeddings. A query whose mode cannot run
        here (no embedding model) gets the exception instead, alone."""
        if not queries or not self.documents:
            return [[] for _ in queries]
        for query in queries:
            if query.mode not in RETRIEVAL_MODES:
                raise ValueError(f"unknown retrieval mode {query.mode!r}")
        needs_text = [i for i, q in enumerate(queries) if q.mode != "vector"]
        needs_vectors = [i for i, q in enumerate(queries) if q.mode != "text"]
        text = self._text_scores([queries[i].question for i in needs_text]) if needs_text else None
        text_row = {i: row for row, i in enumerate(needs_text)}
        vector_scores: np.ndarray | Exception | None = None
        if needs_vectors:
            vector_scores = self._vector_scores([queries[i].question for i in needs_vectors])
        vector_row = {i: row for row, i in enumerate(needs_vectors)}
        masks: dict[str | None, np.ndarray] = {}
        results: list[list[dict[str, Any]] | Exception] = []
        for i, query in enumerate(queries):
            if query.course not in masks:
                masks[query.course] = self._mask(query.course)
            mask = masks[query.course]
            if query.mode == "text":
                assert text is not None
                results.append(self._text_ranked(text[text_row[i]], mask, query.top_k))
            elif isinstance(vector_scores, Exception):
                results.append(vector_scores)
            else:
                assert vector_scores is not None
                scores = vector_scores[vector_row[i]]
                if query.mode == "hybrid":
                    assert text is not None
                    scores = hybrid_scores(scores, text[text_row[i]], mask)
                results.append(self._ranked(scores, mask, query.top_k))
        return results

    def _text_scores(self, questions: list[str]) -> np.ndarray:
        """minsearch's boosted score of every document for each question: (questions, documents).

        Follows minsearch's `Index.search` step by step, so text results equal it (a test compares all 674 dev
        questions); several times faster than one search per question.
        """
        scores = np.zeros((len(questions), len(self.documents)))
        # Same computation without sklearn's per-call argument checks (a third of this pass): the arguments are
        # our fitted vectorizers' own output, always valid and finite. The setting is per thread.
        with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
            for field in TEXT_FIELDS:
                vectors = self.index.vectorizers[field].transform(questions)
                scores += cosine_similarity(vectors, self.index.text_matrices[field]) * BOOST.get(field, 1)
        return scores

    def _vector_scores(self, questions: list[str]) -> np.ndarray | Exception:
        from worker.embeddings import RetrievalUnavailable

        if self.vectors is None:
            return RetrievalUnavailable("this worker has no embedding model configured for vector retrieval")
        try:
            return self.vectors.get().scores(questions)
        except RetrievalUnavailable as exc:
            return exc

    def _mask(self, course: str | None) -> np.ndarray:
        """1.0 for the documents a question may get (its course's, or all), else 0.0: minsearch's own filter."""
        return np.asarray(self.index._filter.apply({"course": course} if course else {}), dtype=float)

    def _text_ranked(self, row: np.ndarray, mask: np.ndarray, top_k: int) -> list[dict[str, Any]]:
        # minsearch's own ranking: documents with a positive score, best first.
        row = row * mask
        non_zero = np.where(row > 0)[0]
        ranked = non_zero[np.argsort(-row[non_zero])][: min(top_k, len(non_zero))]
        return [self.documents[i] for i in ranked]

    def _ranked(self, scores: np.ndarray, mask: np.ndarray, top_k: int) -> list[dict[str, Any]]:
        # Every document of the course is a candidate, best first; ties keep corpus order.
        allowed = np.where(mask > 0)[0]
        ranked = allowed[np.argsort(-scores[allowed], kind="stable")][:top_k]
        return [self.documents[i] for i in ranked]


def hybrid_scores(vector: np.ndarray, text: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Cosine similarity plus `HYBRID_TEXT_WEIGHT` x text score relative to the best among the candidates."""
    best = float(np.max(text * mask, initial=0.0))
    if best <= 0:
        return vector
    return vector + HYBRID_TEXT_WEIGHT * (text / best)


def source_view(doc: dict[str, Any], in_prompt: bool) -> dict[str, Any]:
    """What a job's `sources` show of a retrieved document."""
    return {
        "id": doc["id"],
        "course": doc["course"],
        "section": doc.get("section", ""),
        "question": doc["question"],
        "in_prompt": in_prompt,
    }
