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

from shared import redis_keys
from shared.config import Settings
from shared.errors import ModelLoadError
from shared.jobs import JobStatus
from shared.models import ModelSpec
from shared.store import JobStore, announce_worker, connect
from worker.corpus import load_documents
from worker.duties import Duties, start_duties
from worker.generation import Generator, load_generator, resolve_device
from worker.handoff import InteractiveHandoff
from worker.ledger import Ledger
from worker.microbatcher import SKIPPED, Microbatcher, MicrobatchInfo, MicrobatchItem
from worker.pipeline import CallLimits, CallSizeCap, Prepared, generate_prepared, prepare_questions, prompt_fitter
from worker.prompt import DEFAULT_TEMPLATE, PromptFitter, check_template
from worker.retrieval import Retriever
from worker.tiny import ensure_tiny_model

log = logging.getLogger(__name__)

# Backlog items kept on the model's batch queue, in microbatches: enough to fill microbatches, shallow enough
# that a newly submitted batch starts within seconds.
FEED_MICROBATCHES = 4

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
        """Skip jobs cancelled while they waited; retrieve and build the prompts of the rest."""
        live = self._still_running(items, range(len(items)))
        questions = [items[i].payload for i in live]
        return PreparedMicrobatch(live, prepare_questions(questions, self.retriever, self.preparing, self.fitter))

    def run(self, items: Sequence[MicrobatchItem], prepared: PreparedMicrobatch) -> list[Any]:
        """Per item: `(Answer, MicrobatchInfo)`, the exception that failed it, or `SKIPPED`."""
        started = time.monotonic()
        # Prepared while the microbatch before was on the model: skip what was cancelled since.
        still = set(self._still_running(items, prepared.live))
        kept = [(i, p) for i, p in zip(prepared.live, prepared.prepared, strict=True) if i in still]
        results: list[Any] = [SKIPPED] * len(items)
        answers = generate_prepared([p for _, p in kept], self.generator, self.limits)
        for (i, _), result in zip(kept, answers, strict=True):
            info = MicrobatchInfo(len(kept), (started - items[i].enqueued_at) * 1000)
            results[i] = result if isinstance(result, Exception) else (result, info)
        return results

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

    @property
    def model_name(self) -> str:
        """The served model's name (what jobs ask for)."""
        return self.settings.worker_spec.name


def load_model(spec: ModelSpec, settings: Settings) -> Generator:
    """The model for `spec`, or the tiny stand-in when allowed and the real one cannot be had."""
    options: dict[str, Any] = {"device": settings.device, "dtype": settings.dtype, "max_input_tokens": settings.max_input_tokens}
    options |= {"max_memory": settings.max_memory, "offload_dir": settings.data_dir / "offload"}
    try:
        return load_generator(spec.source, label=spec.source, **options)
    except ModelLoadError as exc:
        if not settings.fallback_tiny_model:
            raise
        path = ensure_tiny_model(settings.data_dir / "tiny-models" / "t5", "t5")
        label = f"tiny-random-t5 (stand-in for {spec.source}, which could not be loaded; answers are gibberish)"
        log.warning("ragq: %s cannot be loaded (%s); serving a tiny random model instead", spec.source, exc)
        return load_generator(str(path), label=label, **options)


def load(settings: Settings, worker_name: str) -> Resident:
    """Load corpus, index and model, warm the model up, start the microbatcher and the duties, announce readiness."""
    spec = settings.worker_spec
    template = check_template(settings.read_prompt_template() or DEFAULT_TEMPLATE)
    documents = load_documents(settings.documents, settings.data_dir)
    retriever = Retriever(documents)
    generator = load_model(spec, settings)
    generator.warm_up()
    caps = microbatch_settings(settings)
    store = JobStore(connect(settings.effective_redis_url, threads=caps.thread_pool_size), settings.result_ttl_s)
    interactive_queue = redis_keys.model_queue(spec.name)
    handoff = InteractiveHandoff(lambda: bool(store.redis.llen(interactive_queue)))
    answerer = Answerer(store, retriever, generator, template, CallLimits(CallSizeCap(caps.max_size), caps.max_tokens))
    resident = Resident(
        settings=settings,
        worker_name=worker_name,
        store=store,
        served_by=generator.label,
        microbatcher=Microbatcher(answerer, caps.max_size, caps.wait_ms, handoff),
        handoff=handoff,
        duties=start_duties(settings, store, worker_name, FEED_MICROBATCHES * caps.max_size),
        ledger=Ledger(settings.execution_ledger),
    )
    # `ragq serve` and the tests wait for this before sending work.
    announce_worker(store.redis, worker_name, spec.name)
    log.info("ragq worker ready: model %s, %d documents, microbatches of up to %d", spec.name, len(documents), caps.max_size)
    return resident


_resident: Resident | None = None
_load_lock = threading.Lock()


def current(settings: Settings, worker_name: str | None = None) -> Resident:
    """This process's resident state, loading it on first use if the worker's start-up signal did not."""
    global _resident
    with _load_lock:
        if _resident is None:
            _resident = load(settings, worker_name or socket.gethostname())
        return _resident


def note_reserved(resident: Resident, job_id: str) -> None:
    """Record that this worker holds the message of `job_id` (see `worker.liveness`: a dead worker's jobs)."""
    pipe = resident.store.redis.pipeline(transaction=False)
    pipe.sadd(redis_keys.worker_jobs(resident.worker_name), job_id)
    pipe.sadd(redis_keys.workers_with_jobs(), resident.worker_name)
    pipe.execute()
