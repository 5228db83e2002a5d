"""The simulated accelerator (worker/simulated.py): loading, deterministic answers, the time model, the GIL share."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from api import create_app
from shared.config import Settings
from shared.errors import ModelLoadError
from shared.models import ModelSpec
from tests.helpers import start_worker
from worker.corpus import load_documents
from worker.generation import GenerationError, SimulatedGenerator, load_generator
from worker.model_check import check_source
from worker.pipeline import Question, answer
from worker.retrieval import Retriever
from worker.simulated import SPEC_FILE, write_spec_dir

PROMPT = "How do I add more workers to ragq?"
GREEDY = {"num_beams": 1, "max_new_tokens": 100}


def load(source: str | Path, **options: Any) -> SimulatedGenerator:
    generator = load_generator(str(source), **options)
    assert isinstance(generator, SimulatedGenerator)
    return generator


def test_a_builtin_spec_loads_by_name_with_its_calibration() -> None:
    generator = load("sim:flan-t5-xl-h200")
    assert generator.label == "sim:flan-t5-xl-h200" and generator.context_tokens == 512
    assert generator.spec.cpu_share == 0.2 and generator.device.type == "cpu"
    # The H200 figures it is calibrated to: 4.1 s for 128 prompts x 64 new tokens, 1.67 s for one.
    assert generator.spec.call_s(batch=128, padded_tokens=512, new_tokens=64) == pytest.approx(4.1, abs=0.05)
    assert generator.spec.call_s(batch=1, padded_tokens=350, new_tokens=64) == pytest.approx(1.67, abs=0.05)
    assert generator.effective_params({}) == {"num_beams": 5, "max_new_tokens": 100, "do_sample": False}


def test_a_spec_directory_loads_on_a_builtin_base_with_its_overrides(tmp_path: Path) -> None:
    directory = write_spec_dir(tmp_path / "my-sim", "instant", context_tokens=64, cpu_share=0.5, stats_file="calls.jsonl")
    generator = load(directory)
    assert generator.spec.name == "my-sim" and generator.spec.cpu_share == 0.5
    assert generator.spec.stats_file == str(directory.resolve() / "calls.jsonl")
    assert generator.context_tokens == 64
    assert load(directory, max_input_tokens=32).context_tokens == 32
    assert check_source(str(directory)) is None and check_source("sim:instant") is None


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"base": "instant", "warp_factor": 9}, "unknown simulated-model fields ['warp_factor']"),
        ({"base": "instant", "cpu_share": 1.5}, "cpu_share must lie in [0, 1]"),
        ({"base": "nope"}, "is not a built-in simulated model"),
        ({"cpu_share": 0.1}, "lacks fields"),
    ],
)
def test_a_bad_spec_is_refused_by_loading_and_by_the_check(tmp_path: Path, spec: dict[str, Any], problem: str) -> None:
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(ModelLoadError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        load_generator(str(tmp_path))
    assert problem in (check_source(str(tmp_path)) or "")
    assert "no built-in simulated model 'nope'" in (check_source("sim:nope") or "")


def test_simulated_models_get_valid_served_names() -> None:
    assert ModelSpec.parse("sim:flan-t5-xl-h200") == ModelSpec("sim-flan-t5-xl-h200", "sim:flan-t5-xl-h200")
    assert ModelSpec.parse("mine=sim:instant") == ModelSpec("mine", "sim:instant")


def test_answers_depend_only_on_the_prompt_and_count_their_tokens_honestly() -> None:
    generator = load("sim:instant")
    first, other, again = generator.generate([PROMPT, "Something else entirely", PROMPT], GREEDY)
    assert first == again and first.text != other.text
    # Another call, another loaded instance (its own tokenizer build): the same answer.
    assert load("sim:instant").generate([PROMPT], GREEDY) == [first]
    eos = generator.tokenizer.eos_token_id
    for result in (first, other):
        assert result.completion_tokens == len(result.token_ids)
        assert 8 <= result.completion_tokens <= 48 and result.token_ids[-1] == eos
        assert result.text == generator.tokenizer.decode(result.token_ids, skip_special_tokens=True).strip()
        assert result.text and eos not in result.token_ids[:-1]
    assert first.prompt_tokens == generator.count_tokens(PROMPT)
    [cut] = generator.generate([PROMPT], {**GREEDY, "max_new_tokens": 3})
    assert cut.token_ids == first.token_ids[:3] and cut.completion_tokens == 3
    [held] = generator.generate([PROMPT], {**GREEDY, "max_new_tokens": 60, "min_new_tokens": 60})
    assert held.completion_tokens == 60 and held.token_ids[-1] == eos and eos not in held.token_ids[:-1]


def test_a_prompt_over_the_spec_budget_fails_with_a_generation_error(tmp_path: Path) -> None:
    generator = load(write_spec_dir(tmp_path, "instant", context_tokens=16))
    with pytest.raises(GenerationError, match="takes at most 16"):
        generator.generate([PROMPT * 10], GREEDY)


def test_device_time_is_the_spec_formula_for_the_call_shapes(tmp_path: Path) -> None:
    costs = {"prefill_base_ms": 1.0, "prefill_per_token_ms": 0.01, "step_base_ms": 0.5, "step_per_seq_ms": 0.2}
    directory = write_spec_dir(tmp_path, "instant", cpu_share=0.0, step_per_ctx_token_ms=0.001, stats_file="c.jsonl", **costs)
    generator = load(directory)
    prompts = [PROMPT, "A short one", "And a third, somewhat longer question about batches?"]

    def expected_s(batch: int, padded: int, new_tokens: int, beams: int) -> float:
        sequences = batch * beams
        prefill_ms = 1.0 + 0.01 * batch * padded
        steps_ms = sum(0.5 + 0.2 * sequences + 0.001 * sequences * (padded + t) for t in range(new_tokens))
        return (prefill_ms + steps_ms) / 1000

    padded = max(generator.count_tokens(p) for p in prompts)
    generator.generate(prompts, {"num_beams": 2, "max_new_tokens": 5, "min_new_tokens": 5})
    first = expected_s(3, padded, 5, 2)
    assert generator.device_busy_s == pytest.approx(first)
    generator.generate(prompts[:1], {"num_beams": 1, "max_new_tokens": 20, "min_new_tokens": 20})
    second = expected_s(1, generator.count_tokens(prompts[0]), 20, 1)
    assert generator.device_busy_s == pytest.approx(first + second)
    lines = [json.loads(line) for line in (directory / "c.jsonl").read_text().splitlines()]
    assert [(line["batch"], line["new_tokens"]) for line in lines] == [(3, 5), (1, 20)]
    assert [line["device_s"] for line in lines] == pytest.approx([first, second])
    assert all(line["start"] <= line["end"] for line in lines)
    # The wall time a call takes is at least its device time.
    assert lines[0]["end"] - lines[0]["start"] >= first * 0.99
    # Costs grow with the batch, the prompt length and the new tokens.
    spec = generator.spec
    assert spec.call_s(8, 100, 10) < spec.call_s(16, 100, 10) < spec.call_s(16, 200, 10) < spec.call_s(16, 200, 20)


def counter_progress_during(generator: SimulatedGenerator) -> float:
    """Increments per second a second Python thread makes while `generator` answers one call."""
    stop = threading.Event()
    count = [0]

    def count_up() -> None:
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=count_up)
    started = time.perf_counter()
    thread.start()
    generator.generate([PROMPT], {"num_beams": 1, "max_new_tokens": 10, "min_new_tokens": 10})
    stop.set()
    thread.join()
    return count[0] / (time.perf_counter() - started)


def test_the_cpu_share_holds_the_gil_and_the_device_share_releases_it(tmp_path: Path) -> None:
    # Ten steps of 30 ms: 0.3 s per call.
    generators = {
        share: load(write_spec_dir(tmp_path / str(share), "instant", step_base_ms=30.0, cpu_share=share))
        for share in (0.0, 1.0)
    }
    free = counter_progress_during(generators[0.0])
    held = counter_progress_during(generators[1.0])
    # Holding the GIL for whole steps leaves the counter only the interpreter's switch intervals (about half).
    assert held < 0.75 * free, (held, free)


@pytest.mark.slow
def test_a_worker_serves_a_simulated_model_with_the_answers_its_spec_gives(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    directory = write_spec_dir(tmp_path / "sim-e2e", "instant", stats_file="calls.jsonl")
    sim_settings = dataclasses.replace(settings, extra_models=(*settings.extra_models, ModelSpec("sim-e2e", str(directory))))
    worker = start_worker(sim_settings, "sim-e2e", redis_client)
    try:
        client = create_app(sim_settings).test_client()
        params = {"num_beams": 1, "max_new_tokens": 20}
        questions = ["How do I add more workers?", "What does ragq serve start?"]
        ids = []
        for question in questions:
            response = client.post("/v1/jobs", json={"question": question, "model": "sim-e2e", "params": params})
            assert response.status_code == 202, response.get_json()
            ids.append(response.get_json()["id"])
        jobs = [client.get(f"/v1/jobs/{job_id}?wait=60").get_json() for job_id in ids]
    finally:
        worker.stop()
    retriever = Retriever(load_documents(None, tmp_path))
    generator = load(directory)
    for question, job in zip(questions, jobs, strict=True):
        assert job["status"] == "succeeded", job
        expected = answer(Question(question, None, 5, params), retriever, generator)
        assert job["answer"] == expected.text and job["served_by"] == str(directory)
        assert job["usage"]["completion_tokens"] == expected.completion_tokens
        assert job["usage"]["prompt_tokens"] == expected.prompt_tokens
    calls = [json.loads(line) for line in (directory / "calls.jsonl").read_text().splitlines()]
    # The worker's warm-up and at least one call for the jobs.
    assert len(calls) >= 2
