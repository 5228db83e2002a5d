"""What a worker process keeps resident, built once in one step: model, retriever, microbatcher, duties."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import torch

from shared import redis_keys
from shared.config import Settings
from shared.errors import ModelLoadError
from shared.jobs import JobStatus
from shared.models import ModelSpec
from shared.store import JobStore, announce_worker, connect
from worker.corpus import load_documents
from worker.duties import Duties, start_duties
from worker.embeddings import vector_index
from worker.engine import EngineLane
from worker.engine_process import EngineOptions
from worker.generation import Generator, enable_continuous, load_generator, load_preparing, resolve_device, resolve_dtype
from worker.handoff import InteractiveHandoff
from worker import metrics as worker_metrics
from worker.ledger import Ledger
from worker.lane import Lane, LocalLane
from worker.microbatcher import SKIPPED, Microbatcher, MicrobatchInfo, MicrobatchItem
from worker.pipeline import (
    CallLimits,
    CallSizeCap,
    GenerateRequest,
    Prepared,
    answers_of,
    generate_requests,
    prepare_questions,
    prompt_fitter,
    requests_of,
)
from worker.prompt import DEFAULT_TEMPLATE, PromptFitter, check_template
from worker.registry import WorkerRegistration, describe, registration_for
from worker.retrieval import Retriever
from worker.tiny import ensure_tiny_model

log = logging.getLogger(__name__)

# (max_microbatch_size, microbatch_wait_ms, max_microbatch_tokens) when not configured.
MICROBATCH_DEFAULTS = {"cpu": (16, 20, 16_384), "cuda": (64, 5, 65_536)}


@dataclass(frozen=True)
class MicrobatchSettings:
    """The microbatch caps this worker runs with."""

    max_size: int
    wait_ms: int
    max_tokens: int

    @property
    def thread_pool_size(self) -> int:
        """Celery threads: one microbatch running while the next one fills."""
        return 2 * self.max_size


def microbatch_settings(settings: Settings) -> MicrobatchSettings:
    """The configured microbatch caps, or the defaults for the device this worker runs on."""
    size, wait_ms, tokens = MICROBATCH_DEFAULTS["cuda" if resolve_device(settings.device).type == "cuda" else "cpu"]
    return MicrobatchSettings(
        max_size=settings.max_microbatch_size or size,
        wait_ms=wait_ms if settings.microbatch_wait_ms is None else settings.microbatch_wait_ms,
        max_tokens=settings.max_microbatch_tokens or tokens,
    )


@dataclass
class PreparedMicrobatch:
    """A microbatch ready for the model: the jobs still to answer and their prepared prompts."""

    live: list[int]
    prepared: list[Prepared | Exception]


@dataclass(frozen=True)
class Launch:
    """A microbatch on its way to the model: the jobs still running with their preparations, and the requests
    for the model (one per prepared job among them)."""

    kept: list[tuple[int, Prepared | Exception]]
    requests: list[GenerateRequest]


@dataclass(frozen=True)
class Answerer:
    """Answers microbatches in two stages (see `worker.microbatcher`): prepare without the model, then run on it."""

    store: JobStore
    retriever: Retriever
    generator: Generator
    template: str
    limits: CallLimits
    # The preparer's view of the model (its own tokenizer: see `Generator.for_preparing`), and one fitter per
    # worker, which remembers the token counts of the FAQ entries it has seen.
    preparing: Generator = field(init=False)
    fitter: PromptFitter = field(init=False)

    def __post_init__(self) -> None:
        preparing = self.generator.for_preparing()
        object.__setattr__(self, "preparing", preparing)
        object.__setattr__(self, "fitter", prompt_fitter(preparing, self.template))

    def prepare(self, items: Sequence[MicrobatchItem]) -> PreparedMicrobatch:
        """Retrieve and build the prompts. (Jobs cancelled meanwhile are left out at `launch`, the one status
        read per microbatch: their jobs were claimed moments ago, and retrieval costs less than a read.)"""
        live = list(range(len(items)))
        questions = [items[i].payload for i in live]
        return PreparedMicrobatch(live, prepare_questions(questions, self.retriever, self.preparing, self.fitter))

    def launch(self, items: Sequence[MicrobatchItem], prepared: PreparedMicrobatch) -> Launch:
        """Just before the model: skip what was cancelled since it was prepared; the requests for the model."""
        still = set(self._still_running(items, prepared.live))
        kept = [(i, p) for i, p in zip(prepared.live, prepared.prepared, strict=True) if i in still]
        return Launch(kept, requests_of([p for _, p in kept]))

    def finish(self, items: Sequence[MicrobatchItem], launch: Launch, generated: Sequence[Any], started_at: float) -> list[Any]:
        """Per item: `(Answer, MicrobatchInfo)`, the exception that failed it, or `SKIPPED`."""
        results: list[Any] = [SKIPPED] * len(items)
        answers = answers_of([p for _, p in launch.kept], generated)
        worker_metrics.microbatch_finished(len(launch.kept), generated)
        for (i, _), result in zip(launch.kept, answers, strict=True):
            info = MicrobatchInfo(len(launch.kept), (started_at - items[i].enqueued_at) * 1000)
            results[i] = result if isinstance(result, Exception) else (result, info)
        return results

    def run(self, items: Sequence[MicrobatchItem], prepared: PreparedMicrobatch) -> list[Any]:
        """The model's part in this process (`RAGQ_ENGINE=thread`): launch, generate, finish."""
        started = time.monotonic()
        launch = self.launch(items, prepared)
        return self.finish(items, launch, generate_requests(launch.requests, self.generator, self.limits), started)

    def _still_running(self, items: Sequence[MicrobatchItem], indices: Sequence[int]) -> list[int]:
        """Those of `indices` whose jobs are still `running` (not cancelled, expired or finished meanwhile)."""
        indices = list(indices)
        try:
            statuses = self.store.statuses([items[i].job_id for i in indices])
        except redis.RedisError:
            # Redis is away (a restart): answer them all. A job cancelled meanwhile keeps its status, since
            # the final transition refuses to overwrite it, and the results wait for Redis to come back.
            log.warning("cannot read the microbatch's statuses; answering all %d jobs", len(indices))
            return indices
        worker_metrics.jobs_found_ended(statuses)
        return [i for i, status in zip(indices, statuses, strict=True) if status is JobStatus.RUNNING]

    def __call__(self, items: Sequence[MicrobatchItem]) -> list[Any]:
        """Both stages at once."""
        return self.run(items, self.prepare(items))


@dataclass(frozen=True)
class Resident:
    """Everything a worker process needs to answer jobs, built once by `load`."""

    settings: Settings
    worker_name: str
    store: JobStore
    served_by: str
    microbatcher: Microbatcher
    handoff: InteractiveHandoff
    duties: Duties
    ledger: Ledger = field(default_factory=lambda: Ledger(None))
    # The corpus's indexes, for scoring the items of evaluated batches (`worker.tasks`).
    retriever: Retriever | None = None

    @property
    def model_name(self) -> str:
        """The served model's name (what jobs ask for)."""
        return self.settings.worker_spec.name


def continuous_cache_tokens(caps: MicrobatchSettings) -> int:
    """The paged cache of continuous batching: twice a static call's padded prompt tokens, for prompts and answers."""
    return 2 * caps.max_tokens


def load_model(spec: ModelSpec, settings: Settings) -> Generator:
    """The model for `spec`, or the tiny stand-in when allowed and the real one cannot be had."""
    options: dict[str, Any] = {"device": settings.device, "dtype": settings.dtype, "max_input_tokens": settings.max_input_tokens}
    options |= {"max_memory": settings.max_memory, "offload_dir": settings.data_dir / "offload"}
    try:
        return load_generator(spec.source, label=spec.source, **options)
    except ModelLoadError as exc:
        source, label = _stand_in(spec, settings, exc)
        return load_generator(source, label=label, **options)


def load_preparing_model(spec: ModelSpec, settings: Settings) -> tuple[Generator, str]:
    """The model's config and tokenizer without its weights (the engine process loads those), or the stand-in's;
    and where the engine finds the model."""
    try:
        return load_preparing(spec.source, label=spec.source, max_input_tokens=settings.max_input_tokens), spec.source
    except ModelLoadError as exc:
        source, label = _stand_in(spec, settings, exc)
        return load_preparing(source, label=label, max_input_tokens=settings.max_input_tokens), source


def _stand_in(spec: ModelSpec, settings: Settings, problem: ModelLoadError) -> tuple[str, str]:
    """The tiny model's directory and label, when the configured model cannot be had and the stand-in is allowed."""
    if not settings.fallback_tiny_model:
        raise problem
    path = ensure_tiny_model(settings.data_dir / "tiny-models" / "t5", "t5")
    log.warning("ragq: %s cannot be loaded (%s); serving a tiny random model instead", spec.source, problem)
    return str(path), f"tiny-random-t5 (stand-in for {spec.source}, which could not be loaded; answers are gibberish)"


def model_lane(settings: Settings, answerer: Answerer, source: str) -> Lane:
    """Where the model runs, started: the engine process (default, loading `source`) or a thread."""
    if settings.engine == "thread":
        return LocalLane(answerer)
    options = EngineOptions(
        source=source,
        label=answerer.generator.label,
        device=settings.device,
        dtype=settings.dtype,
        max_input_tokens=settings.max_input_tokens,
        max_call_size=answerer.limits.cap.ceiling,
        max_call_tokens=answerer.limits.max_tokens,
        log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
        max_memory=settings.max_memory,
        offload_dir=str(settings.data_dir / "offload"),
        continuous=settings.continuous_batching == "auto",
        continuous_cache_tokens=continuous_cache_tokens(microbatch_settings(settings)),
    )
    lane = EngineLane(answerer, options, hang_after_s=settings.task_time_limit_s)
    lane.start()
    return lane


def load(settings: Settings, worker_name: str) -> Resident:
    """Load corpus, index and model, warm the model up, start the microbatcher and the duties, announce readiness."""
    spec = settings.worker_spec
    template = check_template(settings.read_prompt_template() or DEFAULT_TEMPLATE)
    documents = load_documents(settings.documents, settings.data_dir)
    if settings.engine == "process":
        # The model runs in the engine process; torch here only embeds questions (vector, hybrid retrieval). One
        # thread: two contend with the engine's and with each other (MiniLM, 16 questions: 6.7 ms each on one
        # thread, 36 ms on two, on a busy 2-core machine; docs/benchmarks.md).
        torch.set_num_threads(1)
    retriever = Retriever(documents, vector_index(settings.embedding_model, documents, settings.data_dir))
    if settings.retrieval != "text" and retriever.vectors is not None:
        # Jobs that name no mode need the embedding model: load it (and embed or read the corpus) now, not in
        # the first job's microbatch. A failure is kept for those jobs (`retrieval_unavailable`), not raised.
        retriever.vectors.load_now()
    caps = microbatch_settings(settings)
    if settings.engine == "thread":
        generator, source = load_model(spec, settings), spec.source
        if settings.continuous_batching == "auto":
            enable_continuous(generator, continuous_cache_tokens(caps))
        generator.warm_up()
    else:
        generator, source = load_preparing_model(spec, settings)
    client = connect(
        settings.effective_redis_url,
        threads=caps.thread_pool_size,
        sentinel_master=settings.sentinel_master,
        sentinel_password=settings.sentinel_password,
    )
    store = JobStore(client, settings.result_ttl_s)
    interactive_queue = redis_keys.model_queue(spec.name)
    handoff = InteractiveHandoff(lambda: bool(store.redis.llen(interactive_queue)))
    answerer = Answerer(store, retriever, generator, template, CallLimits(CallSizeCap(caps.max_size), caps.max_tokens))
    listed = registration(settings, store, worker_name, caps)
    with listed.while_loading():
        lane = model_lane(settings, answerer, source)
    listed.attach(lane, description(settings, caps, lane))
    resident = Resident(
        settings=settings,
        worker_name=worker_name,
        store=store,
        served_by=generator.label,
        microbatcher=Microbatcher(answerer, caps.max_size, caps.wait_ms, handoff, lane=lane),
        handoff=handoff,
        duties=start_duties(settings, store, worker_name, listed),
        ledger=Ledger(settings.execution_ledger),
        retriever=retriever,
    )
    worker_metrics.start(settings, worker_name)
    # `ragq serve` and the tests wait for this before sending work.
    announce_worker(store.redis, worker_name, spec.name)
    log.info(
        "ragq worker ready: model %s (%s), %d documents, microbatches of up to %d",
        spec.name, "engine process" if settings.engine == "process" else "in-process", len(documents), caps.max_size,
    )
    return resident


def registration(settings: Settings, store: JobStore, worker_name: str, caps: MicrobatchSettings) -> WorkerRegistration:
    """This worker's entry in the live registry, its engine `starting` until `attach`."""
    return registration_for(store.redis, settings.worker_spec.name, worker_name, settings.worker_ttl_s, description(settings, caps))


def description(settings: Settings, caps: MicrobatchSettings, lane: Lane | None = None) -> dict[str, Any]:
    """Where this worker's model runs (the engine's own word, once it is ready), in which dtype, with which caps."""
    info = lane.info if isinstance(lane, EngineLane) else {}
    device = torch.device(info["device"]) if info.get("device") else resolve_device(settings.device)
    dtype = str(resolve_dtype(settings.dtype, device)).removeprefix("torch.")
    return describe(str(device), dtype, caps.max_size, caps.max_tokens)


_resident: Resident | None = None
_load_lock = threading.Lock()


def current(settings: Settings, worker_name: str | None = None) -> Resident:
    """This process's resident state, loading it on first use if the worker's start-up signal did not."""
    global _resident
    with _load_lock:
        if _resident is None:
            _resident = load(settings, worker_name or socket.gethostname())
        return _resident


def shutdown() -> None:
    """Stop this process's microbatcher and its model's lane (the engine process), if loaded."""
    with _load_lock:
        if _resident is not None:
            _resident.microbatcher.stop()
            _resident.duties.stop()


def note_reserved(resident: Resident, job_id: str) -> None:
    """Record that this worker holds the message of `job_id` (see `worker.liveness`: a dead worker's jobs)."""
    pipe = resident.store.redis.pipeline(transaction=False)
    pipe.sadd(redis_keys.worker_jobs(resident.worker_name), job_id)
    pipe.sadd(redis_keys.workers_with_jobs(), resident.worker_name)
    pipe.execute()
