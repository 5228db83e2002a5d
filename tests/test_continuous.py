"""Continuous batching (worker/continuous.py) on the tiny random Phi-3: token for token what static greedy gives.

The reference is static greedy `model.generate` run one prompt at a time, cut after its first eos. No mocks: the
tiny model is built with `save_pretrained` and loaded back with `from_pretrained`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

from cli.processes import child_env
from worker.continuous import (
    ContinuousSession,
    ContinuousUnsupported,
    generate_continuous,
    supports_continuous,
    unsupported_reason,
)
from worker.prompt import DEFAULT_TEMPLATE

MAX_NEW_TOKENS = 12
QUESTIONS = [
    "Hi",
    "How do I join the course after it has started?",
    "What happens when Redis is down and I submit a job with a long question about the workers and the queue?",
    "Is it free?",
    " ".join(["Why does my worker stop consuming after a Redis restart, and how do I get my homework graded?"] * 5),
    "Can I use Windows?",
]


def load_phi3(path: Path, attention: str = "sdpa") -> PreTrainedModel:
    """The tiny Phi-3 from disk; the test is skipped when the installed transformers cannot batch continuously."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention).eval()
    reason = unsupported_reason(model)
    if reason is not None:
        pytest.skip(f"continuous batching unavailable: {reason}")
    return model


@pytest.fixture(scope="module")
def phi3(tiny_models: dict[str, Path]) -> PreTrainedModel:
    return load_phi3(tiny_models["phi3"])


@pytest.fixture(scope="module")
def prompts(tiny_models: dict[str, Path]) -> list[list[int]]:
    """The questions rendered with the chat template as `ChatGenerator` renders them, every other one inside the RAG
    template (so those share their first 40 tokens): 8 to over 100 tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["phi3"])
    rag = [DEFAULT_TEMPLATE.format(question=q, context=f"question: {q}") for q in QUESTIONS]
    contents = [rag[i] if i % 2 else q for i, q in enumerate(QUESTIONS)]
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        for c in contents
    ]
    ids = [list(tokenizer(text, add_special_tokens=False).input_ids) for text in rendered]
    assert len({len(i) for i in ids}) == len(ids)  # all of different lengths
    return ids


def static_greedy(model: PreTrainedModel, prompt: list[int], eos: int) -> list[int]:
    """Static greedy `generate` for one prompt alone: its new tokens, cut after the first eos."""
    input_ids = torch.tensor([prompt])
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            num_beams=1,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=eos,
            pad_token_id=model.config.pad_token_id,
        )
    new = output[0, len(prompt) :].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


@pytest.fixture(scope="module")
def emitted_eos(phi3: PreTrainedModel, prompts: list[list[int]]) -> int:
    """A token the random model emits for some prompts early and not at all for others: as eos, it ends some
    answers before max_new_tokens and lets others run to the limit (the model's own eos never comes)."""
    unstopped = [static_greedy(phi3, p, eos=phi3.generation_config.eos_token_id) for p in prompts]
    for token in (t for answer in unstopped for t in answer[1 : MAX_NEW_TOKENS - 2]):
        if sum(token in a[: MAX_NEW_TOKENS - 1] for a in unstopped) and sum(token not in a for a in unstopped) >= 2:
            return token
    pytest.fail("no token of the tiny model ends some answers early and not others")


@pytest.fixture(scope="module")
def reference(phi3: PreTrainedModel, prompts: list[list[int]], emitted_eos: int) -> list[list[int]]:
    answers = [static_greedy(phi3, p, emitted_eos) for p in prompts]
    # Both ways of ending are covered: at the eos, and at the limit.
    assert any(a[-1] == emitted_eos and len(a) < MAX_NEW_TOKENS for a in answers)
    assert any(len(a) == MAX_NEW_TOKENS and emitted_eos not in a for a in answers)
    assert len({tuple(a) for a in answers}) == len(answers)  # distinct, so an order mix-up shows
    return answers


def run(model: PreTrainedModel, prompts: list[list[int]], eos: int, **settings: int | bool) -> list[list[int]]:
    return generate_continuous(
        model,
        prompts,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_ids={eos},
        pad_token_id=model.config.pad_token_id,
        **settings,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    "settings",
    [
        {},
        # Prompts prefilled in chunks of 16 tokens over several steps; pages of 16 tokens, so the prompts in the
        # RAG template share the cache of its first 32 tokens.
        {"max_batch_tokens": 16, "page_size": 16},
        {"prefix_sharing": False, "max_requests_per_batch": 2},
    ],
    ids=["defaults", "chunked-prefill-small-pages", "no-sharing-two-at-a-time"],
)
def test_continuous_answers_equal_static_greedy_one_at_a_time(
    phi3: PreTrainedModel, prompts: list[list[int]], emitted_eos: int, reference: list[list[int]], settings: dict
) -> None:
    assert run(phi3, prompts, emitted_eos, **settings) == reference


def test_answers_come_back_in_input_order_not_finishing_order(
    phi3: PreTrainedModel, prompts: list[list[int]], emitted_eos: int, reference: list[list[int]]
) -> None:
    # The longest prompt first: answers that end sooner (one ends after two tokens) come out of the manager first.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    assert run(phi3, [prompts[i] for i in order], emitted_eos) == [reference[i] for i in order]


def test_eager_model_matches_its_static_greedy_and_gets_its_attention_back(
    tiny_models: dict[str, Path], prompts: list[list[int]], emitted_eos: int
) -> None:
    eager = load_phi3(tiny_models["phi3"], attention="eager")
    expected = [static_greedy(eager, p, emitted_eos) for p in prompts]
    assert run(eager, prompts, emitted_eos) == expected
    # The manager runs it as `paged|eager` meanwhile; static `generate` needs plain eager again.
    assert eager.config._attn_implementation == "eager"


def test_session_takes_requests_as_they_come_and_evicts_when_its_cache_is_full(
    phi3: PreTrainedModel, prompts: list[list[int]], emitted_eos: int, reference: list[list[int]]
) -> None:
    # Room for the longest request alone, not for all at once: requests wait, or are evicted and prefilled again.
    longest = max(len(p) for p in prompts) + MAX_NEW_TOKENS
    session = ContinuousSession(
        phi3, eos_token_ids={emitted_eos}, pad_token_id=0, cache_tokens=longest + 16, page_size=16
    )
    with session:
        first = [
            session.submit(p, max_new_tokens=MAX_NEW_TOKENS, request_id=f"q{i}") for i, p in enumerate(prompts[:3])
        ]
        done = session.wait(first, timeout_s=60)
        rest = [session.submit(p, max_new_tokens=MAX_NEW_TOKENS) for p in prompts[3:]]
        done |= session.wait(rest, timeout_s=60)
        assert session.collect() == {}
        session.submit(prompts[0], max_new_tokens=1, request_id="twice")
        with pytest.raises(ValueError, match="already"):
            session.submit(prompts[0], max_new_tokens=1, request_id="twice")
        assert list(session.wait(["twice"], timeout_s=60)) == ["twice"]
        with pytest.raises(ContinuousUnsupported, match="do not fit a cache"):
            session.submit(prompts[0], max_new_tokens=session.cache_tokens, request_id="too-long")
    assert [done[rid] for rid in first + rest] == reference


def test_encoder_decoder_models_are_not_supported(tiny_models: dict[str, Path]) -> None:
    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_models["t5"])
    assert supports_continuous(t5) is False
    assert "encoder-decoder" in (unsupported_reason(t5) or "")
    with pytest.raises(ContinuousUnsupported, match="encoder-decoder"):
        generate_continuous(t5, [[5, 6, 7]], max_new_tokens=2, eos_token_ids={1}, pad_token_id=0)


def test_support_check_never_raises_on_what_it_does_not_know() -> None:
    assert supports_continuous(object()) is False
    assert supports_continuous(None) is False


@pytest.mark.parametrize(
    ("setting", "named"),
    [({"repetition_penalty": 1.3}, "RepetitionPenaltyLogitsProcessor"), ({"min_new_tokens": 4}, "min_new_tokens")],
)
def test_generation_settings_the_manager_would_silently_drop_are_refused(
    phi3: PreTrainedModel, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch, setting: dict, named: str
) -> None:
    # Static `generate` honours these from the model's generation config; the manager would answer without them.
    config = phi3.generation_config.__class__.from_dict({**phi3.generation_config.to_dict(), **setting})
    monkeypatch.setattr(phi3, "generation_config", config)
    with pytest.raises(ContinuousUnsupported, match=named):
        run(phi3, prompts[:1], 1)


def test_no_prompts_no_work(phi3: PreTrainedModel) -> None:
    assert run(phi3, [], 1) == []


@pytest.mark.slow
def test_benchmark_runs_and_its_answers_agree(tmp_path: Path) -> None:
    # A subprocess, as `python -m bench.continuous` is run (it also sets torch's thread count for its process).
    out = tmp_path / "figures.json"
    args = ["--prompts", "8", "--max-new-tokens", "4", "--repeats", "1", "--json", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "bench.continuous", *args],
        capture_output=True, text=True, timeout=300, env=child_env(HF_HUB_OFFLINE="1"), check=False,
    )  # fmt: skip
    if result.returncode == 2 and "not available" in result.stderr:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads(out.read_text())
    runs = {row["run"]: row for row in figures["runs"]}
    assert set(runs) == {"static-16", "static-32", "continuous", "continuous-all"}
    assert all(row["prompts"] == 8 and row["tokens"] > 0 and row["equal_to_static_16"] == 8 for row in runs.values())


def test_a_phi3_generator_answers_greedy_calls_by_continuous_batching_with_static_tokens(tiny_models: dict[str, Path]) -> None:
    from worker.generation import ChatGenerator, enable_continuous, load_generator

    static = load_generator(str(tiny_models["phi3"]), device="cpu")
    continuous = load_generator(str(tiny_models["phi3"]), device="cpu")
    assert isinstance(continuous, ChatGenerator)
    if not enable_continuous(continuous, cache_tokens=4096):
        pytest.skip("the installed transformers cannot run continuous batching for this model")
    prompts = ["How do I add workers?", "What is ragq? " * 6, "Cancel a job, please.", "x " * 40]
    greedy = {"num_beams": 1, "max_new_tokens": 12}
    expected = static.generate(prompts, greedy)
    for _ in range(2):  # the session stays for the next call
        assert [g.token_ids for g in continuous.generate(prompts, greedy)] == [g.token_ids for g in expected]
        assert continuous._session is not None
    # A call continuous batching would answer differently goes static, and the session is stopped first.
    with_min = {"num_beams": 1, "max_new_tokens": 12, "min_new_tokens": 12}
    assert [g.token_ids for g in continuous.generate(prompts, with_min)] == [g.token_ids for g in static.generate(prompts, with_min)]
    assert continuous._session is None
    # The T5 family never turns it on.
    assert not enable_continuous(load_generator(str(tiny_models["t5"]), device="cpu"), cache_tokens=4096)
