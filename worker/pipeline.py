"""The pure RAG pipeline: retrieve -> build prompt -> generate, for one question or a microbatch.

No Redis, no Celery, no GPU needed. A microbatch runs one retrieval pass and one `generate` call per group of
questions whose generation settings can share a call, split further by the call caps. One bad question fails
alone: preparation errors are per question, and a failing `generate` call is split in halves until the
failure is isolated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.prompt import DEFAULT_TEMPLATE, Prompt, PromptFitter
from worker.generation import Generation, GenerationError, Generator
from worker.retrieval import Query, Retriever, source_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Question:
    """What the pipeline needs of a job."""

    question: str
    course: str | None = None
    top_k: int = 5
    params: dict[str, Any] = field(default_factory=dict)
    retrieval: str = "text"


@dataclass(frozen=True)
class Answer:
    """The pipeline's result for one question."""

    text: str
    sources: list[dict[str, Any]]
    prompt_tokens: int
    completion_tokens: int
    retrieval_ms: float
    generation_ms: float
    # Questions in the `generate` call that answered this one.
    call_size: int = 1


@dataclass(frozen=True)
class GenerateRequest:
    """What the model needs of one prepared question (all the engine process receives of it)."""

    prompt: str
    params: dict[str, Any]
    prompt_tokens: int

    @property
    def group_key(self) -> tuple[tuple[str, Any], ...]:
        """Questions with equal keys can share one `generate` call."""
        return tuple(sorted(self.params.items()))

    @property
    def cost_factor(self) -> int:
        """How many sequences the model runs for this question (beams each need their own)."""
        return int(self.params.get("num_beams", 1))


@dataclass(frozen=True)
class Generated:
    """The model's answer to one request, and the `generate` call it came from."""

    generation: Generation
    generation_ms: float
    call_size: int


@dataclass(frozen=True)
class Prepared:
    """A question with its retrieved documents and built prompt, ready to generate."""

    documents: list[dict[str, Any]]
    prompt: Prompt
    params: dict[str, Any]
    prompt_tokens: int
    retrieval_ms: float

    @property
    def request(self) -> GenerateRequest:
        return GenerateRequest(self.prompt.text, self.params, self.prompt_tokens)


class CallSizeCap:
    """The most questions one `generate` call may take: lowered after an out-of-memory error, restored later."""

    def __init__(self, ceiling: int, recover_after_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ceiling = ceiling
        self.recover_after_s = recover_after_s
        self.clock = clock
        self._value = ceiling
        self._changed_at = clock()

    @property
    def value(self) -> int:
        # Double back towards the ceiling once a quiet period has passed since the last change.
        if self._value < self.ceiling and self.clock() - self._changed_at >= self.recover_after_s:
            self._value = min(self.ceiling, self._value * 2)
            self._changed_at = self.clock()
        return self._value

    def lower(self, failed_size: int) -> None:
        """A call of `failed_size` questions ran out of memory: allow at most half that for a while."""
        self._value = max(1, min(self._value, failed_size // 2))
        self._changed_at = self.clock()


@dataclass(frozen=True)
class CallLimits:
    """Caps on one `generate` call: a count (adaptive) and padded input tokens times beams."""

    cap: CallSizeCap
    max_tokens: int


def prompt_fitter(generator: Generator, template: str = DEFAULT_TEMPLATE) -> PromptFitter:
    """A fitter counting tokens as `generator` does; keep one per worker, so source entries are counted once."""
    return PromptFitter(generator.count_tokens_many, generator.count_text_tokens, template)


def prepare_microbatch(
    questions: Sequence[Question], retrieved: Sequence[list[dict[str, Any]]], retrieval_ms: float, generator: Generator, fitter: PromptFitter
) -> list[Prepared | Exception]:
    """Build every prompt from its retrieved documents; a question too long even without sources gets a
    `GenerationError`, alone."""
    params = [generator.effective_params(q.params) for q in questions]
    budgets = [generator.prompt_budget(p) for p in params]
    fitted = fitter.fit([q.question for q in questions], retrieved, budgets)
    prepared: list[Prepared | Exception] = []
    for documents, (prompt, prompt_tokens), question_params, budget in zip(retrieved, fitted, params, budgets, strict=True):
        if prompt_tokens > budget:
            prepared.append(GenerationError(f"prompt is {prompt_tokens} tokens; this model takes at most {budget}"))
        else:
            prepared.append(Prepared(list(documents), prompt, question_params, prompt_tokens, retrieval_ms))
    return prepared


def plan_calls(requests: Sequence[GenerateRequest], max_size: int, max_tokens: int) -> list[list[int]]:
    """Split `requests` into `generate` calls: same settings together, sorted by length to cut padding, within caps."""
    groups: dict[tuple[tuple[str, Any], ...], list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request.group_key, []).append(i)
    calls: list[list[int]] = []
    for members in groups.values():
        members.sort(key=lambda i: requests[i].prompt_tokens)
        call: list[int] = []
        for i in members:
            # Sorted ascending, so the newest member is the longest: padded size = count x its length.
            cost = (len(call) + 1) * requests[i].prompt_tokens * requests[i].cost_factor
            if call and (len(call) >= max_size or cost > max_tokens):
                calls.append(call)
                call = []
            call.append(i)
        calls.append(call)
    return calls


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def generate_isolating(
    generator: Generator, prompts: list[str], params: dict[str, Any], cap: CallSizeCap
) -> list[Generation | Exception]:
    """One `generate` call; if it raises, split it in halves and retry, so a bad input fails alone."""
    try:
        return list(generator.generate(prompts, params))
    except Exception as exc:
        if len(prompts) == 1:
            return [exc]
        if is_out_of_memory(exc):
            cap.lower(len(prompts))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("out of memory generating %d prompts; call size cap now %d", len(prompts), cap.value)
        else:
            log.warning("generate failed for a call of %d (%s); splitting it", len(prompts), exc)
        middle = len(prompts) // 2
        return generate_isolating(generator, prompts[:middle], params, cap) + generate_isolating(
            generator, prompts[middle:], params, cap
        )


def prepare_questions(
    questions: Sequence[Question], retriever: Retriever, generator: Generator, fitter: PromptFitter
) -> list[Prepared | Exception]:
    """The first stage, without the model: retrieve for every question, then fit its prompt. A question that
    cannot be prepared gets its exception, alone."""
    started = time.perf_counter()
    try:
        retrieved = retriever.retrieve([Query(q.question, q.course, q.top_k, q.retrieval) for q in questions])
    except Exception as exc:  # a failure of the whole pass fails its questions, not the worker
        return [exc] * len(questions)
    # One pass for the microbatch; each question is charged its share.
    retrieval_ms = (time.perf_counter() - started) * 1000 / max(1, len(questions))
    # A question whose retrieval failed (vector retrieval without an embedding model) fails alone.
    results: list[Prepared | Exception] = [r for r in retrieved if isinstance(r, Exception)]
    if len(results) == len(questions):
        return results
    found = [(q, documents) for q, documents in zip(questions, retrieved, strict=True) if not isinstance(documents, Exception)]
    try:
        prepared = prepare_microbatch([q for q, _ in found], [d for _, d in found], retrieval_ms, generator, fitter)
    except Exception as exc:  # a failure of the whole pass (say, the tokenizer) fails its questions, not the worker
        prepared = [exc] * len(found)
    ready = iter(prepared)
    return [documents if isinstance(documents, Exception) else next(ready) for documents in retrieved]


def generate_requests(requests: Sequence[GenerateRequest], generator: Generator, limits: CallLimits) -> list[Generated | Exception]:
    """The model's part (what the engine process runs): one `generate` call per group of equal settings, within
    the limits; each request gets its generation or the exception that failed it alone."""
    results: list[Generated | Exception | None] = [None] * len(requests)
    for call in plan_calls(requests, limits.cap.value, limits.max_tokens):
        started = time.perf_counter()
        prompts = [requests[i].prompt for i in call]
        generations = generate_isolating(generator, prompts, requests[call[0]].params, limits.cap)
        generation_ms = (time.perf_counter() - started) * 1000
        for i, generation in zip(call, generations, strict=True):
            results[i] = generation if isinstance(generation, Exception) else Generated(generation, generation_ms, len(call))
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def requests_of(prepared: Sequence[Prepared | Exception]) -> list[GenerateRequest]:
    """The requests for the model: one per question that was prepared."""
    return [p.request for p in prepared if not isinstance(p, Exception)]


def answers_of(prepared: Sequence[Prepared | Exception], generated: Sequence[Generated | Exception]) -> list[Answer | Exception]:
    """Put the model's results (one per `requests_of(prepared)`) together with the preparations into answers."""
    outputs = iter(generated)
    results: list[Answer | Exception] = []
    for p in prepared:
        if isinstance(p, Exception):
            results.append(p)
            continue
        output = next(outputs)
        results.append(output if isinstance(output, Exception) else _answer(p, output))
    return results


def generate_prepared(prepared: Sequence[Prepared | Exception], generator: Generator, limits: CallLimits) -> list[Answer | Exception]:
    """The second stage, on the model in this process."""
    return answers_of(prepared, generate_requests(requests_of(prepared), generator, limits))


def answer_microbatch(
    questions: Sequence[Question],
    retriever: Retriever,
    generator: Generator,
    template: str = DEFAULT_TEMPLATE,
    limits: CallLimits | None = None,
    fitter: PromptFitter | None = None,
) -> list[Answer | Exception]:
    """Answer every question; each result is an `Answer` or the exception that failed that question alone."""
    limits = limits or CallLimits(CallSizeCap(max(1, len(questions))), max_tokens=1 << 40)
    prepared = prepare_questions(questions, retriever, generator, fitter or prompt_fitter(generator, template))
    return generate_prepared(prepared, generator, limits)


def _answer(prepared: Prepared, generated: Generated) -> Answer:
    used = prepared.prompt.sources_used
    generation = generated.generation
    return Answer(
        text=generation.text,
        sources=[source_view(doc, in_prompt=rank < used) for rank, doc in enumerate(prepared.documents)],
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        retrieval_ms=prepared.retrieval_ms,
        generation_ms=generated.generation_ms,
        call_size=generated.call_size,
    )


def answer(question: Question, retriever: Retriever, generator: Generator, template: str = DEFAULT_TEMPLATE) -> Answer:
    """Answer one question from the FAQ with the resident model (the seed's one-at-a-time shape)."""
    [result] = answer_microbatch([question], retriever, generator, template)
    if isinstance(result, Exception):
        raise result
    return result
