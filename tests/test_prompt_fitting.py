"""The microbatch prompt fitter gives exactly the prompts the one-at-a-time fitting gives, with few tokenizer calls."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from bench.prepare import CountingTokenizer
from worker.corpus import load_documents
from worker.generation import Generator, load_generator
from worker.pipeline import prompt_fitter
from worker.prompt import DEFAULT_TEMPLATE, PromptFitter, build_prompt
from tests.test_microbatching import QUESTIONS as MICROBATCH_QUESTIONS
from worker.retrieval import Retriever

# The microbatching tests' questions, and two that stress fitting: a very short one, and one too long for any source.
QUESTIONS = [*MICROBATCH_QUESTIONS, "x", "Why " * 150 + "?"]


@pytest.fixture(scope="module", params=["t5", "phi3"])
def generator(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Generator:
    return load_generator(str(tiny_models[request.param]), device="cpu")


def one_at_a_time(generator: Generator, question: str, sources: list[dict[str, Any]], budget: int) -> tuple[Any, int]:
    prompt = build_prompt(question, sources, template=DEFAULT_TEMPLATE, count_tokens=generator.count_tokens, max_tokens=budget)
    return prompt, generator.count_tokens(prompt.text)


def check_equal(generator: Generator, questions: list[str], sources: list[list[dict[str, Any]]], budgets: list[int]) -> None:
    fitter = prompt_fitter(generator)
    fitted = fitter.fit(questions, sources, budgets)
    expected = [one_at_a_time(generator, q, s, b) for q, s, b in zip(questions, sources, budgets, strict=True)]
    assert fitted == expected


@pytest.mark.parametrize("budget", [10, 60, 120, 200, 350, 512, 4096])
def test_fitted_prompts_equal_one_at_a_time_fitting(generator: Generator, tmp_path: Path, budget: int) -> None:
    retriever = Retriever(load_documents(None, tmp_path))
    sources = retriever.search_many([(q, None, 5) for q in QUESTIONS])
    check_equal(generator, QUESTIONS, sources, [budget] * len(QUESTIONS))
    # Budgets differ within one microbatch too (jobs asking for longer answers leave less room).
    check_equal(generator, QUESTIONS, sources, [budget + 37 * i for i in range(len(QUESTIONS))])


def test_fitted_prompts_equal_one_at_a_time_fitting_on_the_course_questions(generator: Generator, shared_data: Path, tmp_path: Path) -> None:
    with (shared_data / "questions-dev.csv").open() as f:
        rows = list(csv.DictReader(f))[:200]
    retriever = Retriever(load_documents(str(shared_data / "documents.json"), tmp_path))
    sources = retriever.search_many([(row["question"], row["course"], 5) for row in rows])
    for budget in (256, 512):
        check_equal(generator, [row["question"] for row in rows], sources, [budget] * len(rows))


def test_a_microbatch_is_fitted_in_a_few_tokenizer_calls_and_entries_are_counted_once(generator: Generator, tmp_path: Path) -> None:
    retriever = Retriever(load_documents(None, tmp_path))
    questions = QUESTIONS * 16
    sources = retriever.search_many([(q, None, 5) for q in questions])
    fitter = prompt_fitter(generator)
    counting = CountingTokenizer(generator.tokenizer)
    generator.tokenizer = counting  # type: ignore[assignment]
    try:
        fitter.fit(questions, sources, [200] * len(questions))
        first = counting.calls
        counting.calls = 0
        fitter.fit(questions, sources, [200] * len(questions))
        again = counting.calls
    finally:
        generator.tokenizer = counting.inner
    # One call for the new entries (and one for the separator), one for the bare prompts, then one per search
    # step over the whole microbatch; one-at-a-time fitting made several per prompt (128 prompts here).
    assert first <= 8
    # The entries are remembered: the second microbatch does not count them again.
    assert again <= first - 1


def words(texts: Any) -> list[int]:
    return [len(text.split()) for text in texts]


@pytest.mark.parametrize("error", [-6, -1, 0, 1, 6], ids=lambda e: f"pieces off by {e}")
def test_the_search_finds_the_exact_prefix_however_far_the_sum_is_off(error: int) -> None:
    # Token counts are not additive where pieces meet; here the pieces' counts are off by `error` tokens each,
    # so the estimate starts the search too high or too low.
    docs = [{"section": f"s{i}", "question": f"q{i}", "text": "w " * (5 + 3 * i)} for i in range(6)]
    fitter = PromptFitter(words, lambda texts: [max(0, n + error) for n in words(texts)])
    questions = ["how?"] * 12
    budgets = [20 + 9 * i for i in range(12)]
    fitted = fitter.fit(questions, [docs] * 12, budgets)
    for (prompt, tokens), budget in zip(fitted, budgets, strict=True):
        expected = build_prompt("how?", docs, count_tokens=lambda text: len(text.split()), max_tokens=budget)
        assert (prompt, tokens) == (expected, len(expected.text.split()))


def test_a_fitter_whose_memory_overflows_starts_over_and_still_fits_exactly(generator: Generator, tmp_path: Path) -> None:
    retriever = Retriever(load_documents(None, tmp_path))
    sources = retriever.search_many([(q, None, 5) for q in QUESTIONS])
    fitter = prompt_fitter(generator)
    fitter.MAX_REMEMBERED = 3  # type: ignore[misc]
    for _ in range(2):
        fitted = fitter.fit(QUESTIONS, sources, [200] * len(QUESTIONS))
        assert fitted == [one_at_a_time(generator, q, s, 200) for q, s in zip(QUESTIONS, sources, strict=True)]
