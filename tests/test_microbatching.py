"""Microbatching: grouping, caps, failure isolation, out-of-memory recovery, cancellation in the window."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from shared.config import Settings
from shared.jobs import Job, JobStatus
from worker.prompt import DEFAULT_TEMPLATE, Prompt
from cli.redis_server import free_port
from shared.store import JobStore, connect
from worker.handoff import InteractiveHandoff
from worker.microbatcher import BACKLOG, SKIPPED, Microbatcher, MicrobatchItem, OneStage
from worker.corpus import load_documents
from worker.generation import Generation, Generator, load_generator
from worker.pipeline import CallSizeCap, CallLimits, GenerateRequest, Prepared, Question, answer_microbatch, plan_calls
from worker.retrieval import Retriever
from worker.runtime import Answerer

QUESTIONS = [
    "How do I add more workers?",
    "What does ragq serve start?",
    "How are errors reported?",
    "Which models can ragq serve?",
    "How do I cancel a job?",
    "What is the default model?",
]


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    return Retriever(load_documents(None, tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def t5(tiny_models: dict[str, Path]) -> Generator:
    return load_generator(str(tiny_models["t5"]), device="cpu")


class Recording:
    """Wraps a generator: records each call's size and can raise on chosen inputs."""

    def __init__(self, inner: Generator, fail_if: Any = None) -> None:
        self.inner = inner
        self.fail_if = fail_if
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def generate(self, prompts: list[str], params: dict[str, Any]) -> list[Generation]:
        self.calls.append(len(prompts))
        if self.fail_if is not None:
            self.fail_if(prompts)
        return self.inner.generate(prompts, params)


def request(tokens: int, **params: Any) -> GenerateRequest:
    return Prepared([], Prompt("p", 0), params, tokens, 0.0).request


def test_plan_groups_by_settings_and_sorts_by_length() -> None:
    items = [request(30, num_beams=1), request(10, num_beams=1), request(20, num_beams=2), request(5, num_beams=1)]
    calls = plan_calls(items, max_size=10, max_tokens=10_000)
    assert sorted(calls) == [[2], [3, 1, 0]]


def test_plan_respects_count_and_token_caps() -> None:
    items = [request(100) for _ in range(10)]
    assert [len(c) for c in plan_calls(items, max_size=4, max_tokens=10_000)] == [4, 4, 2]
    # Padded tokens: 3 x 100 = 300 fits, 4 x 100 does not.
    assert [len(c) for c in plan_calls(items, max_size=100, max_tokens=300)] == [3, 3, 3, 1]
    beams = [request(100, num_beams=4) for _ in range(3)]
    assert [len(c) for c in plan_calls(beams, max_size=100, max_tokens=800)] == [2, 1]


def test_microbatch_runs_one_generate_call_per_settings_group(retriever: Retriever, t5: Generator) -> None:
    generator = Recording(t5)
    questions = [Question(q, params={"max_new_tokens": 3 + (i % 2), "min_new_tokens": 3 + (i % 2)}) for i, q in enumerate(QUESTIONS)]
    results = answer_microbatch(questions, retriever, generator)  # type: ignore[arg-type]
    assert sorted(generator.calls) == [3, 3]
    for question, result in zip(questions, results, strict=True):
        assert not isinstance(result, Exception)
        assert result.completion_tokens == question.params["max_new_tokens"]
        assert result.call_size == 3


def test_batched_answers_equal_one_at_a_time_answers(retriever: Retriever, t5: Generator) -> None:
    questions = [Question(q, params={"max_new_tokens": 6, "num_beams": 1}) for q in QUESTIONS]
    batched = answer_microbatch(questions, retriever, t5)
    single = [answer_microbatch([q], retriever, t5)[0] for q in questions]
    assert [(a.text, a.sources, a.prompt_tokens) for a in batched] == [(a.text, a.sources, a.prompt_tokens) for a in single]  # type: ignore[union-attr]


def test_poisoned_input_fails_alone_after_splitting(retriever: Retriever, t5: Generator) -> None:
    def poison(prompts: list[str]) -> None:
        if any("POISON" in p for p in prompts):
            raise RuntimeError("bad input")

    generator = Recording(t5, poison)
    questions = [Question(q, params={"max_new_tokens": 2}) for q in QUESTIONS]
    questions[3] = Question("POISON pill", params={"max_new_tokens": 2})
    results = answer_microbatch(questions, retriever, generator)  # type: ignore[arg-type]
    assert isinstance(results[3], RuntimeError)
    assert all(not isinstance(r, Exception) for i, r in enumerate(results) if i != 3)
    assert generator.calls[0] == 6 and 1 in generator.calls


def test_question_too_long_for_the_model_fails_in_preparation_alone(retriever: Retriever, t5: Generator) -> None:
    generator = Recording(t5)
    questions = [Question(QUESTIONS[0]), Question(" ".join(f"w{i}" for i in range(400))), Question(QUESTIONS[1])]
    results = answer_microbatch([Question(q.question, params={"max_new_tokens": 2}) for q in questions], retriever, generator)  # type: ignore[arg-type]
    assert "at most 512" in str(results[1])
    assert generator.calls == [2]


def test_out_of_memory_splits_recovers_and_lowers_the_cap(retriever: Retriever, t5: Generator) -> None:
    def small_only(prompts: list[str]) -> None:
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    generator = Recording(t5, small_only)
    now = [0.0]  # the cap's clock, moved by hand: a slow machine must not let it recover mid-test
    cap = CallSizeCap(ceiling=8, recover_after_s=60, clock=lambda: now[0])
    questions = [Question(q, params={"max_new_tokens": 2}) for q in QUESTIONS]
    results = answer_microbatch(questions, retriever, generator, DEFAULT_TEMPLATE, CallLimits(cap, 1 << 30))  # type: ignore[arg-type]
    assert all(not isinstance(r, Exception) for r in results)
    assert cap.value == 1  # 6 failed -> 3, then 3 failed -> 1
    # The lowered cap shapes the next microbatch: no call above it, so no more failures.
    generator.calls.clear()
    answer_microbatch(questions[:2], retriever, generator, DEFAULT_TEMPLATE, CallLimits(cap, 1 << 30))  # type: ignore[arg-type]
    assert generator.calls == [1, 1]
    now[0] += 59
    assert cap.value == 1
    now[0] += 1
    assert cap.value == 2
    now[0] += 60
    assert cap.value == 4


def test_microbatcher_takes_what_waits_within_the_window() -> None:
    seen: list[int] = []

    def run(items: Sequence[MicrobatchItem]) -> list[Any]:
        seen.append(len(items))
        return [item.payload * 2 for item in items]

    microbatcher = Microbatcher(OneStage(run), max_size=4, wait_ms=200)
    futures = [microbatcher.submit(f"j{i}", i) for i in range(6)]
    assert [f.result(timeout=5) for f in futures] == [0, 2, 4, 6, 8, 10]
    assert seen == [4, 2]
    microbatcher.stop()


def test_microbatcher_does_not_wait_past_the_window() -> None:
    microbatcher = Microbatcher(OneStage(lambda items: [None] * len(items)), max_size=64, wait_ms=50)
    started = time.monotonic()
    microbatcher.submit("j", 1).result(timeout=5)
    assert time.monotonic() - started < 1
    microbatcher.stop()


def test_microbatcher_goes_on_when_redis_cannot_say_whether_interactive_jobs_wait() -> None:
    # Found by bench.chaos: this check raised during a Redis restart, ended the microbatcher thread, and every
    # job the worker took afterwards timed out.
    def redis_down() -> bool:
        raise redis.ConnectionError("Connection refused")

    microbatcher = Microbatcher(OneStage(lambda items: [item.payload * 2 for item in items]), max_size=4, wait_ms=0, handoff=InteractiveHandoff(redis_down))
    assert microbatcher.submit("a", 1, BACKLOG).result(timeout=5) == 2
    assert microbatcher.submit("b", 2, BACKLOG).result(timeout=5) == 4
    microbatcher.stop()


def test_microbatcher_survives_a_batch_that_raises() -> None:
    def run(items: Sequence[MicrobatchItem]) -> list[Any]:
        if items[0].payload == "boom":
            raise ValueError("boom")
        return ["ok"] * len(items)

    microbatcher = Microbatcher(OneStage(run), max_size=1, wait_ms=0)
    with pytest.raises(ValueError):
        microbatcher.submit("a", "boom").result(timeout=5)
    assert microbatcher.submit("b", "fine").result(timeout=5) == "ok"
    microbatcher.stop()


def test_job_cancelled_in_the_microbatch_window_is_skipped(
    store: JobStore, settings: Settings, retriever: Retriever, t5: Generator
) -> None:
    answerer = Answerer(store, retriever, t5, DEFAULT_TEMPLATE, CallLimits(CallSizeCap(8), 1 << 30))
    microbatcher = Microbatcher(answerer, max_size=8, wait_ms=500)
    jobs = []
    for i, q in enumerate(QUESTIONS[:3]):
        job = Job(id=f"job-{i}", status=JobStatus.QUEUED, question=q, model="tiny-t5")
        store.create(job)
        store.transition(job.id, JobStatus.RUNNING)
        jobs.append(job)
    futures = [microbatcher.submit(job.id, Question(job.question, params={"max_new_tokens": 2})) for job in jobs]
    threading.Timer(0.1, lambda: store.transition("job-1", JobStatus.CANCELLED)).start()
    outcomes = [f.result(timeout=30) for f in futures]
    assert outcomes[1] is SKIPPED
    for outcome in (outcomes[0], outcomes[2]):
        answer, info = outcome
        assert info.size == 2 and info.wait_ms >= 0
        assert answer.call_size == 2
    microbatcher.stop()


def test_a_microbatch_is_answered_while_redis_is_away(settings: Settings, retriever: Retriever, t5: Generator) -> None:
    # Found by bench.chaos: the cancelled-jobs check failed whole microbatches during a Redis restart.
    unreachable = JobStore(connect(f"redis://127.0.0.1:{free_port()}/0"), settings.result_ttl_s)
    answerer = Answerer(unreachable, retriever, t5, DEFAULT_TEMPLATE, CallLimits(CallSizeCap(8), 1 << 30))
    items = [MicrobatchItem(f"job-{i}", Question(q, params={"max_new_tokens": 2}), BACKLOG) for i, q in enumerate(QUESTIONS[:2])]
    outcomes = answerer(items)
    assert [info.size for _, info in outcomes] == [2, 2]
    assert all(answer.completion_tokens > 0 for answer, _ in outcomes)


class Timeline:
    """Stages that record when each microbatch (numbered in the order prepared) was prepared and run."""

    def __init__(self, run_s: float) -> None:
        self.run_s = run_s
        self.events: dict[tuple[str, int], float] = {}
        self.sizes: list[int] = []

    def prepare(self, items: Sequence[MicrobatchItem]) -> int:
        number = len(self.sizes)
        self.sizes.append(len(items))
        self.events["prepare", number] = time.monotonic()
        time.sleep(self.run_s / 4)
        self.events["prepared", number] = time.monotonic()
        return number

    def run(self, items: Sequence[MicrobatchItem], number: int) -> list[Any]:
        self.events["run", number] = time.monotonic()
        time.sleep(self.run_s)
        self.events["ran", number] = time.monotonic()
        return [None] * len(items)


def test_the_next_microbatch_is_prepared_while_the_current_one_runs_and_no_further() -> None:
    timeline = Timeline(run_s=0.2)
    # Jobs stop coming after the first 13: the last, partial microbatch closes 0.05 s after its last job.
    microbatcher = Microbatcher(timeline, max_size=4, wait_ms=0, fill_idle_s=0.05)
    futures = [microbatcher.submit(f"j{i}", i, BACKLOG) for i in range(13)]
    for future in futures:
        future.result(timeout=10)
    microbatcher.stop()
    at = timeline.events
    assert sum(timeline.sizes) == 13
    for number in range(1, len(timeline.sizes)):
        # Ready before the model finished the one before it, so the model never waited for Python...
        assert at["prepared", number] < at["ran", number - 1]
        # ...and run right after it.
        assert at["run", number] - at["ran", number - 1] < timeline.run_s / 2
    for number in range(2, len(timeline.sizes)):
        # Only one backlog microbatch is prepared ahead: this one waited until the one two before it ran.
        assert at["prepare", number] >= at["run", number - 1]
    # While the model was busy, the microbatch being collected kept filling: all but the first are full.
    assert timeline.sizes[1:-1] == [4] * (len(timeline.sizes) - 2)


def test_a_backlog_microbatch_goes_at_once_when_no_interactive_job_is_on_its_way() -> None:
    handoff = InteractiveHandoff(lambda: False, settle_max_s=1.0, max_hold_s=0.1)
    # The previous microbatch's tasks have not returned yet: with nothing interactive waiting, that is no
    # reason to keep the model idle.
    handoff.microbatch_done(["a", "b"])
    started = time.monotonic()
    handoff.wait_before_backlog(lambda: False)
    assert time.monotonic() - started < 0.5  # not the settle bound of 1 s
    # With an interactive job queued in Redis it waits for those tasks (here: until the settle bound).
    waiting = InteractiveHandoff(lambda: True, settle_max_s=0.2, max_hold_s=0.05)
    waiting.microbatch_done(["a"])
    started = time.monotonic()
    waiting.wait_before_backlog(lambda: False)
    assert time.monotonic() - started >= 0.2


def test_the_preparer_counts_tokens_while_the_runner_generates(t5: Generator) -> None:
    # A Rust tokenizer shared by two threads is not safe: `generate`'s padded calls switch padding on and off
    # on it, and a count made meanwhile came back padded, or a call failed.
    preparing = t5.for_preparing()
    texts = [q * (1 + i % 4) for i, q in enumerate(QUESTIONS)]
    expected = preparing.count_tokens_many(texts)
    problems: list[object] = []
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            try:
                if preparing.count_tokens_many(texts) != expected:
                    problems.append("a count changed")
            except Exception as exc:
                problems.append(exc)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            t5.generate(texts, {"max_new_tokens": 1, "num_beams": 1})
    finally:
        stop.set()
        counter.join()
    assert problems == []


def test_a_flood_of_interactive_jobs_is_answered_in_full_microbatches_while_the_model_is_busy() -> None:
    sizes: list[int] = []

    def run(items: Sequence[MicrobatchItem]) -> list[Any]:
        sizes.append(len(items))
        time.sleep(0.05)
        return [None] * len(items)

    microbatcher = Microbatcher(OneStage(run), max_size=8, wait_ms=0)
    futures = [microbatcher.submit(f"j{i}", i) for i in range(25)]
    for future in futures:
        future.result(timeout=10)
    microbatcher.stop()
    # The first may go alone (the model was idle); after it, microbatches fill while the model is busy.
    assert sum(sizes) == 25 and len(sizes) <= 5, sizes


def test_a_stage_returning_the_wrong_number_of_results_fails_its_jobs_not_the_runner() -> None:
    def run(items: Sequence[MicrobatchItem]) -> list[Any]:
        return [] if items[0].payload == "short" else ["ok"] * len(items)

    microbatcher = Microbatcher(OneStage(run), max_size=1, wait_ms=0)
    with pytest.raises(RuntimeError, match="0 results for a microbatch of 1"):
        microbatcher.submit("a", "short").result(timeout=5)
    assert microbatcher.submit("b", "fine").result(timeout=5) == "ok"
    microbatcher.stop()


def test_a_task_that_never_returned_does_not_hold_later_backlog_microbatches() -> None:
    handoff = InteractiveHandoff(lambda: True, settle_max_s=1.0, max_hold_s=0.05)
    handoff.microbatch_done(["timed-out"])  # its task stopped waiting at its time limit and returned early
    handoff.microbatch_done(["b"])
    handoff.task_returned("b")
    started = time.monotonic()
    handoff.wait_before_backlog(lambda: False)
    # The hold (0.05 s) for the queued interactive job, not the settle bound (1 s).
    assert time.monotonic() - started < 0.5


def test_jobs_submitted_before_a_stop_are_answered_and_after_it_fail_at_once() -> None:
    def run(items: Sequence[MicrobatchItem]) -> list[Any]:
        time.sleep(0.05)
        return ["ok"] * len(items)

    microbatcher = Microbatcher(OneStage(run), max_size=1, wait_ms=0)
    before = [microbatcher.submit(f"a{i}", i, BACKLOG) for i in range(3)]
    microbatcher.stop()
    assert [f.result(timeout=5) for f in before] == ["ok"] * 3
    with pytest.raises(RuntimeError, match="stopped"):
        microbatcher.submit("late", 9).result(timeout=1)
