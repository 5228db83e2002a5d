"""The pure RAG pipeline: retrieve -> build prompt -> generate. No Redis, no Celery, no GPU needed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from shared.prompt import DEFAULT_TEMPLATE, build_prompt
from worker.generation import Generator
from worker.retrieval import Retriever, source_view


@dataclass(frozen=True)
class Question:
    """What the pipeline needs of a job."""

    question: str
    course: str | None = None
    top_k: int = 5
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    """The pipeline's result for one question."""

    text: str
    sources: list[dict[str, Any]]
    prompt_tokens: int
    completion_tokens: int
    retrieval_ms: float
    generation_ms: float


def answer(question: Question, retriever: Retriever, generator: Generator, template: str = DEFAULT_TEMPLATE) -> Answer:
    """Answer one question from the FAQ with the resident model."""
    started = time.perf_counter()
    documents = retriever.search(question.question, question.course, question.top_k)
    retrieved = time.perf_counter()
    prompt = build_prompt(
        question.question,
        documents,
        template=template,
        count_tokens=generator.count_tokens,
        max_tokens=generator.prompt_budget(question.params),
    )
    [generation] = generator.generate([prompt.text], question.params)
    generated = time.perf_counter()
    return Answer(
        text=generation.text,
        sources=[source_view(doc, in_prompt=rank < prompt.sources_used) for rank, doc in enumerate(documents)],
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        retrieval_ms=(retrieved - started) * 1000,
        generation_ms=(generated - retrieved) * 1000,
    )
