"""Scoring one item of an evaluated batch as its worker finishes it (see `shared.evaluation` for the figures)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.evaluation import item_evaluation
from shared.jobs import Job
from worker.embeddings import RetrievalUnavailable

if TYPE_CHECKING:
    from worker.pipeline import Answer
    from worker.runtime import Resident

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reference:
    """What an item's answer is scored against: the FAQ entry that answers it, a reference answer, or both."""

    expected_document: str | None
    reference_answer: str | None

    @classmethod
    def of(cls, job: Job) -> Reference | None:
        """The job's reference, or None when it carries none (every job outside evaluated batches)."""
        if job.expected_document is None and job.reference_answer is None:
            return None
        return cls(job.expected_document, job.reference_answer)

    def score(self, resident: Resident, answer: Answer) -> dict[str, Any]:
        """Hit and reciprocal rank of the expected entry among the sources; cosine similarity of the answer to
        the reference with the embedding model (two short texts, one encode call: milliseconds on the CPU).
        Without an embedding model the similarity is left out (None), and the job still succeeds."""
        similarity = None
        retriever = resident.retriever
        if self.reference_answer is not None and retriever is not None and retriever.vectors is not None:
            try:
                embedder = retriever.vectors.get().embedder
                answer_vector, reference_vector = embedder.encode([answer.text, self.reference_answer])
                similarity = round(float(answer_vector @ reference_vector), 6)
            except RetrievalUnavailable as exc:
                log.warning("answer not scored: %s", exc.message)
        return item_evaluation(self.expected_document, [source["id"] for source in answer.sources], similarity)
