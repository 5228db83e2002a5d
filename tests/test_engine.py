"""The engine process: same answers as in-process, a SIGKILL mid-microbatch loses and repeats nothing, a job that
crashes the engine every time fails alone, interactive microbatches still go first."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from shared.config import Settings
from shared.jobs import Job, JobStatus
from shared.models import ModelSpec
from shared.store import JobStore
from worker.corpus import load_documents
from worker.engine import EngineLane
from worker.engine_process import EngineCrash, EngineHung, EngineOptions
from worker.generation import load_generator, load_preparing
from worker.microbatcher import BACKLOG, INTERACTIVE, Microbatcher
from worker.pipeline import CallLimits, CallSizeCap, Question, answer_microbatch
from worker.prompt import DEFAULT_TEMPLATE
from worker.retrieval import Retriever
from worker.runtime import Answerer
from worker.simulated import write_spec_dir

POISON = "POISON-PILL"
PARAMS = {"max_new_tokens": 8, "num_beams": 1}
# Each test starts engine processes (a few seconds each on a 2-core machine: torch's import).
pytestmark = pytest.mark.slow

QUESTIONS = [f"How do I add more workers, case {i}?" for i in range(16)]


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    return Retriever(load_documents(None, tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # About 0.4 s per generate call: long enough to kill the engine in the middle of one.
    return write_spec_dir(tmp_path_factory.mktemp("sim") / "slow-sim", "instant", step_base_ms=50.0, crash_marker=POISON)


class Engine:
    """An answerer, an engine lane and a microbatcher around them, with jobs in Redis to answer."""

    def __init__(
        self, store: JobStore, retriever: Retriever, source: Path, max_size: int = 8, hang_after_s: float | None = None
    ) -> None:
        self.store = store
        preparing = load_preparing(str(source))
        self.answerer = Answerer(store, retriever, preparing, DEFAULT_TEMPLATE, CallLimits(CallSizeCap(max_size), 1 << 30))
        options = EngineOptions(str(source), "slow-sim", "cpu", "auto", None, max_size, 1 << 30)
        self.lane = EngineLane(self.answerer, options, on_fatal=self.fatal, hang_after_s=hang_after_s)
        self.fatal_reasons: list[str] = []
        self.microbatcher = Microbatcher(self.answerer, max_size, wait_ms=100, lane=self.lane)

    def fatal(self, reason: str) -> None:
        self.fatal_reasons.append(reason)

    def submit(self, job_id: str, question: str, priority: int = BACKLOG) -> Any:
        self.store.create(Job(id=job_id, status=JobStatus.QUEUED, question=question, model="slow-sim"))
        self.store.transition(job_id, JobStatus.RUNNING)
        return self.microbatcher.submit(job_id, Question(question, params=PARAMS), priority)

    def wait_until_running(self) -> None:
        deadline = time.monotonic() + 10
        while not self.lane.running:
            assert time.monotonic() < deadline, "the engine never started a microbatch"
            time.sleep(0.005)


@pytest.fixture
def engine(store: JobStore, retriever: Retriever, sim_dir: Path) -> Iterator[Engine]:
    engine = Engine(store, retriever, sim_dir)
    yield engine
    engine.microbatcher.stop()


def expected_texts(retriever: Retriever, sim_dir: Path, questions: list[str]) -> list[str]:
    generator = load_generator(str(sim_dir))
    answers = answer_microbatch([Question(q, params=PARAMS) for q in questions], retriever, generator)
    return [a.text for a in answers]  # type: ignore[union-attr]


def test_the_engine_answers_as_the_model_does_in_process(engine: Engine, retriever: Retriever, sim_dir: Path) -> None:
    futures = [engine.submit(f"same-{i}", q) for i, q in enumerate(QUESTIONS[:8])]
    outcomes = [f.result(timeout=30) for f in futures]
    assert [answer.text for answer, _ in outcomes] == expected_texts(retriever, sim_dir, QUESTIONS[:8])
    assert all(info.size == 8 for _, info in outcomes)
    assert engine.lane.pid != os.getpid() and engine.lane.restarts == 0


def test_a_sigkill_mid_microbatch_loses_nothing_and_repeats_nothing(engine: Engine, retriever: Retriever, sim_dir: Path) -> None:
    futures = [engine.submit(f"kill-{i}", q) for i, q in enumerate(QUESTIONS)]
    engine.wait_until_running()
    first_pid = engine.lane.pid
    assert first_pid is not None
    os.kill(first_pid, signal.SIGKILL)
    outcomes = [f.result(timeout=60) for f in futures]
    # Every job answered (a future resolves once: a second result would raise in the engine's reader), with the
    # answer the model gives it.
    assert [answer.text for answer, _ in outcomes] == expected_texts(retriever, sim_dir, QUESTIONS)
    assert engine.lane.restarts == 1 and engine.lane.pid not in (None, first_pid)
    # The worker serves again.
    answer, _ = engine.submit("after", QUESTIONS[0]).result(timeout=30)
    assert answer.text == expected_texts(retriever, sim_dir, QUESTIONS[:1])[0]
    assert engine.fatal_reasons == []


def test_a_job_that_crashes_the_engine_every_time_fails_alone(engine: Engine, retriever: Retriever, sim_dir: Path) -> None:
    questions = QUESTIONS[:7] + [f"{POISON}: what now?"]
    futures = [engine.submit(f"poison-{i}", q) for i, q in enumerate(questions)]
    results: list[Any] = []
    for future in futures:
        try:
            results.append(future.result(timeout=120))
        except Exception as exc:
            results.append(exc)
    assert isinstance(results[-1], EngineCrash), results[-1]
    assert [answer.text for answer, _ in results[:-1]] == expected_texts(retriever, sim_dir, questions[:-1])
    # Cornered by halving: 8 -> 4 -> 2 -> 1, then once more alone; failed before the fourth new engine is up.
    deadline = time.monotonic() + 60
    while engine.lane.restarts < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.lane.restarts == 4
    assert engine.fatal_reasons == []


def test_a_hung_engine_is_killed_and_the_microbatches_behind_it_are_answered(
    store: JobStore, retriever: Retriever, sim_dir: Path
) -> None:
    engine = Engine(store, retriever, sim_dir, hang_after_s=3.0)
    try:
        futures = [engine.submit(f"hang-{i}", q) for i, q in enumerate(QUESTIONS)]
        engine.wait_until_running()
        first_pid = engine.lane.pid
        assert first_pid is not None
        # Alive but silent for ever: what a deadlocked kernel or a stuck driver call looks like from outside.
        os.kill(first_pid, signal.SIGSTOP)
        outcomes: list[Any] = []
        for future in futures:
            try:
                outcomes.append(future.result(timeout=60))
            except Exception as exc:
                outcomes.append(exc)
        hung = [o for o in outcomes if isinstance(o, EngineHung)]
        answered = [o for o in outcomes if not isinstance(o, BaseException)]
        # The microbatch that was running fails (its tasks have given up by then); the one behind it is answered.
        assert len(hung) == 8 and len(answered) == 8, outcomes
        assert [a.text for a, _ in answered] == expected_texts(retriever, sim_dir, QUESTIONS[8:])
        assert engine.lane.hangs == 1 and engine.lane.restarts == 1 and engine.lane.pid not in (None, first_pid)
        answer, _ = engine.submit("after-hang", QUESTIONS[0]).result(timeout=30)
        assert answer.text == expected_texts(retriever, sim_dir, QUESTIONS[:1])[0]
        assert engine.fatal_reasons == []
    finally:
        engine.microbatcher.stop()


def test_an_interactive_microbatch_goes_before_backlog_waiting_in_the_engine(engine: Engine) -> None:
    backlog = [engine.submit(f"b-{i}", q) for i, q in enumerate(QUESTIONS)]
    engine.wait_until_running()
    time.sleep(0.15)  # the second backlog microbatch is in the engine now, waiting
    interactive = engine.submit("i-0", "An interactive question?", INTERACTIVE)
    answer_i, _ = interactive.result(timeout=30)
    # It ran right after the microbatch that was running when it came: before the second backlog one ended.
    assert not backlog[-1].done()
    for future in backlog:
        future.result(timeout=30)
    assert answer_i.text


def test_a_model_the_engine_cannot_load_is_a_load_error(store: JobStore, retriever: Retriever, tmp_path: Path) -> None:
    from shared.errors import ModelLoadError

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    preparing = load_preparing("sim:instant")
    answerer = Answerer(store, retriever, preparing, DEFAULT_TEMPLATE, CallLimits(CallSizeCap(4), 1 << 30))
    lane = EngineLane(answerer, EngineOptions(str(broken), "broken", "cpu", "auto", None, 4, 1 << 30))
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        lane.start()


def engine_pid(worker_pid: int) -> int:
    """The engine process below a worker (spawned: its command line names multiprocessing's spawn entry)."""
    from tests.helpers import descendants

    for pid in descendants(worker_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            return pid
    raise AssertionError(f"no engine process below worker {worker_pid}")


def test_a_real_worker_survives_its_engines_death_and_answers_every_job_once(
    settings: Settings, redis_client: redis.Redis, sim_dir: Path, tmp_path: Path
) -> None:
    import dataclasses

    from api import create_app
    from tests.helpers import alive, start_worker

    ledger = tmp_path / "ledger.jsonl"
    worker_settings = dataclasses.replace(
        settings,
        extra_models=(*settings.extra_models, ModelSpec("sim-engine", str(sim_dir))),
        execution_ledger=ledger,
        max_microbatch_size=8,
    )
    worker = start_worker(worker_settings, "sim-engine", redis_client)
    try:
        client = create_app(worker_settings).test_client()
        questions = [*(f"How do workers scale, take {i}?" for i in range(23)), f"{POISON} in a question"]
        ids = [
            client.post("/v1/jobs", json={"question": q, "model": "sim-engine", "params": PARAMS}).get_json()["id"]
            for q in questions
        ]
        deadline = time.monotonic() + 30
        while not any(client.get(f"/v1/jobs/{i}").get_json()["status"] == "running" for i in ids[:8]):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first_engine = engine_pid(worker.process.pid)
        os.kill(first_engine, signal.SIGKILL)
        jobs = [client.get(f"/v1/jobs/{i}?wait=60").get_json() for i in ids]
        for _ in range(5):  # the poison job takes several restarts
            jobs = [job if job["status"] in ("succeeded", "failed") else client.get(f"/v1/jobs/{job['id']}?wait=60").get_json() for job in jobs]
        assert [job["status"] for job in jobs[:-1]] == ["succeeded"] * 23, [job.get("error") for job in jobs]
        assert jobs[-1]["status"] == "failed" and jobs[-1]["error"]["type"] == "engine_crash"
        # Exactly one stored result per job, and the worker never died: nothing was sent again.
        # The worker appends a job's ledger line just after storing its result: the last may still be on its way.
        ledger_deadline = time.monotonic() + 10
        while True:
            results = [json.loads(line) for line in ledger.read_text().splitlines()]
            stored = Counter(r["job_id"] for r in results if r["event"] == "result")
            if set(stored) >= set(ids) or time.monotonic() > ledger_deadline:
                break
            time.sleep(0.1)
        assert stored == Counter(ids)
        assert alive(worker.process.pid) and engine_pid(worker.process.pid) != first_engine
        again = client.post("/v1/jobs", json={"question": QUESTIONS[0], "model": "sim-engine", "params": PARAMS}).get_json()
        assert client.get(f"/v1/jobs/{again['id']}?wait=60").get_json()["status"] == "succeeded"
    finally:
        worker.stop()
