from pathlib import Path

import pytest
import torch

from shared.errors import ModelLoadError
from worker.generation import ChatGenerator, GenerationError, Seq2SeqGenerator, load_generator

PROMPTS = ["How do I start ragq?", "What happens when Redis is down and I submit a job with a long question?"]


@pytest.fixture(scope="module")
def t5(tiny_models: dict[str, Path]) -> Seq2SeqGenerator:
    generator = load_generator(str(tiny_models["t5"]), device="cpu")
    assert isinstance(generator, Seq2SeqGenerator)
    return generator


@pytest.fixture(scope="module")
def phi3(tiny_models: dict[str, Path]) -> ChatGenerator:
    generator = load_generator(str(tiny_models["phi3"]), device="cpu")
    assert isinstance(generator, ChatGenerator)
    return generator


def test_family_is_read_from_the_config_not_the_name(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    misleading = tmp_path / "phi-3-looking-name"
    misleading.symlink_to(tiny_models["t5"])
    assert isinstance(load_generator(str(misleading), device="cpu"), Seq2SeqGenerator)


def test_missing_model_is_a_clear_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        load_generator(str(tmp_path / "nothing-here"))


def test_cpu_default_dtype_is_fp32(t5: Seq2SeqGenerator) -> None:
    assert t5.model.dtype == torch.float32


@pytest.mark.parametrize("name", ["t5", "phi3"])
def test_generation_reports_tokens_and_respects_max_new_tokens(name: str, request: pytest.FixtureRequest) -> None:
    generator = request.getfixturevalue(name)
    results = generator.generate(PROMPTS, {"max_new_tokens": 6, "min_new_tokens": 6})
    assert len(results) == 2
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert isinstance(result.text, str)
        assert result.completion_tokens == 6
        assert result.prompt_tokens == generator.count_tokens(prompt)


VARIED = [
    "Hi",
    "How do I start ragq?",
    "What happens when Redis is down and I submit a job with a long question about the workers?",
    "Which models can ragq serve, and how do I add a second one on another GPU machine?",
    "ok?",
    " ".join(["Why does my worker stop consuming after a Redis restart"] * 6),
]


@pytest.mark.parametrize("name", ["t5", "phi3"])
def test_batched_greedy_token_ids_match_one_at_a_time(name: str, request: pytest.FixtureRequest) -> None:
    # Prompts of very different lengths: wrong padding or attention masks change the tokens.
    generator = request.getfixturevalue(name)
    params = {"max_new_tokens": 16, "min_new_tokens": 16, "num_beams": 1}
    batched = generator.generate(VARIED, params)
    single = [generator.generate([p], params)[0] for p in VARIED]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.prompt_tokens for r in batched] == [r.prompt_tokens for r in single]
    assert all(len(r.token_ids) == 16 for r in batched)


def test_family_defaults_follow_the_course(t5: Seq2SeqGenerator, phi3: ChatGenerator) -> None:
    assert t5.effective_params({}) == {"num_beams": 5, "max_new_tokens": 100, "do_sample": False}
    assert phi3.effective_params({})["max_new_tokens"] == 500
    assert phi3.effective_params({})["do_sample"] is False


def test_sampling_knobs_only_apply_when_sampling(t5: Seq2SeqGenerator) -> None:
    assert "temperature" not in t5.effective_params({"temperature": 0.5})
    assert t5.effective_params({"temperature": 0.5, "do_sample": True})["temperature"] == 0.5


def test_chat_model_reads_the_prompt_through_its_chat_template(phi3: ChatGenerator) -> None:
    rendered = phi3.render("hello")
    assert rendered.startswith("<|user|>\nhello<|end|>") and rendered.endswith("<|assistant|>\n")


def test_chat_prompt_budget_leaves_room_for_the_answer(phi3: ChatGenerator) -> None:
    assert phi3.prompt_budget({"max_new_tokens": 100}) == phi3.context_tokens - 100


def test_prompt_longer_than_the_model_takes_is_refused(t5: Seq2SeqGenerator) -> None:
    with pytest.raises(GenerationError, match="at most 512"):
        t5.generate([" ".join(f"w{i}" for i in range(2000))], {"max_new_tokens": 2})


def test_max_input_tokens_setting_lowers_the_limit(tiny_models: dict[str, Path]) -> None:
    generator = load_generator(str(tiny_models["t5"]), device="cpu", max_input_tokens=64)
    assert generator.context_tokens == 64
    with pytest.raises(GenerationError, match="at most 64"):
        generator.generate([" ".join(f"w{i}" for i in range(100))], {"max_new_tokens": 2})
