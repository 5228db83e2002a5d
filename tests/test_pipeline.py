from pathlib import Path

import pytest

from worker.prompt import build_prompt
from worker.corpus import load_documents
from worker.generation import Generator, load_generator
from worker.pipeline import Question, answer
from worker.retrieval import Retriever


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    return Retriever(load_documents(None, tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module", params=["t5", "phi3"])
def generator(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Generator:
    return load_generator(str(tiny_models[request.param]), device="cpu")


def test_answer_has_sources_in_retrieval_order(retriever: Retriever, generator: Generator) -> None:
    question = Question("How do I add more workers?", course="ragq", top_k=3, params={"max_new_tokens": 5})
    result = answer(question, retriever, generator)
    expected = retriever.search(question.question, "ragq", 3)
    assert [s["id"] for s in result.sources] == [d["id"] for d in expected]
    assert all(s["in_prompt"] for s in result.sources)
    assert set(result.sources[0]) == {"id", "course", "section", "question", "in_prompt"}
    assert 0 < result.completion_tokens <= 5
    prompt = build_prompt(question.question, expected)
    assert result.prompt_tokens == generator.count_tokens(prompt.text)
    assert result.retrieval_ms > 0 and result.generation_ms > 0


def test_sources_cut_from_the_prompt_are_flagged(retriever: Retriever, tiny_models: dict[str, Path]) -> None:
    generator = load_generator(str(tiny_models["t5"]), device="cpu")
    generator.tokenizer.model_max_length = 250
    result = answer(Question("How do I add more workers?", top_k=10, params={"max_new_tokens": 2}), retriever, generator)
    flags = [s["in_prompt"] for s in result.sources]
    assert len(flags) == 10
    assert flags[0] is True and flags[-1] is False
    assert flags == sorted(flags, reverse=True)
    assert result.prompt_tokens <= 250


def test_course_without_documents_gives_no_sources(retriever: Retriever, generator: Generator) -> None:
    result = answer(Question("anything", course="no-such-course", params={"max_new_tokens": 2}), retriever, generator)
    assert result.sources == []
