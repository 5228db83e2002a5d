"""What a worker process keeps resident: settings, job store, retriever, model, batcher. Loaded once."""

from __future__ import annotations

import logging
import os
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
from worker.prompt import DEFAULT_TEMPLATE, check_template
from shared.store import JobStore, announce_worker, connect
from worker.batching import SKIPPED, BatchInfo, BatchItem, Batcher
from worker.corpus import load_documents
from worker.duties import Duties, start_duties
from worker.ledger import Ledger
from worker.generation import Generator, load_generator, resolve_device
from worker.pipeline import BatchCap, BatchLimits, answer_batch
from worker.retrieval import Retriever
from worker.tiny import ensure_tiny_model

log = logging.getLogger(__name__)

FEED_BATCHES = 4
# Longest pause before a backlog batch while an interactive job is on its way (see Batcher).
HANDOFF_MS = 100

# (max_batch_size, batch_wait_ms, max_batch_tokens) when not configured.
BATCH_DEFAULTS = {"cpu": (16, 20, 16_384), "cuda": (64, 5, 65_536)}


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int
    batch_wait_ms: int
    max_batch_tokens: int

    @property
    def thread_pool_size(self) -> int:
        """Celery threads: one batch running while the next one fills."""
        return 2 * self.max_batch_size


def batch_settings(settings: Settings) -> BatchSettings:
    """The configured batch caps, or the defaults for the device this worker runs on."""
    size, wait_ms, tokens = BATCH_DEFAULTS["cuda" if resolve_device(settings.device).type == "cuda" else "cpu"]
    return BatchSettings(
        max_batch_size=settings.max_batch_size or size,
        batch_wait_ms=wait_ms if settings.batch_wait_ms is None else settings.batch_wait_ms,
        max_batch_tokens=settings.max_batch_tokens or tokens,
    )


@dataclass
class Resident:
    """Everything a worker process needs to answer jobs, built once."""

    settings: Settings
    spec: ModelSpec
    store: JobStore
    retriever: Retriever
    generator: Generator
    template: str
    hostname: str
    limits: BatchLimits
    batcher: Batcher | None = None
    duties: Duties | None = None
    ledger: Ledger = field(default_factory=lambda: Ledger(None))

    def run_batch(self, items: Sequence[BatchItem]) -> list[Any]:
        """Answer a batch: skip jobs cancelled while they waited, then one pipeline pass for the rest."""
        try:
            statuses = self.store.statuses([item.job_id for item in items])
        except redis.RedisError:
            # Redis is away (a restart): answer them all. A job cancelled meanwhile keeps its status, since
            # the final transition refuses to overwrite it, and the results wait for Redis to come back.
            log.warning("cannot read the batch's statuses; answering all %d jobs", len(items))
            statuses = [JobStatus.RUNNING] * len(items)
        live = [i for i, status in enumerate(statuses) if status is JobStatus.RUNNING]
        results: list[Any] = [SKIPPED] * len(items)
        answers = answer_batch([items[i].payload for i in live], self.retriever, self.generator, self.template, self.limits)
        now = time.monotonic()
        wait_ms = {i: (now - items[i].enqueued_at) * 1000 for i in live}
        for i, result in zip(live, answers, strict=True):
            results[i] = result if isinstance(result, Exception) else (result, BatchInfo(len(live), wait_ms[i]))
        return results


_resident: Resident | None = None
_start_lock = threading.Lock()


def load_model(spec: ModelSpec, settings: Settings) -> Generator:
    """The model for `spec`, or the tiny stand-in when allowed and the real one cannot be had."""
    options: dict[str, Any] = {"device": settings.device, "dtype": settings.dtype, "max_input_tokens": settings.max_input_tokens}
    try:
        return load_generator(spec.source, label=spec.source, **options)
    except ModelLoadError as exc:
        if not settings.fallback_tiny_model:
            raise
        path = ensure_tiny_model(settings.data_dir / "tiny-models" / "t5", "t5")
        label = f"tiny-random-t5 (stand-in for {spec.source}, which could not be loaded; answers are gibberish)"
        log.warning("ragq: %s cannot be loaded (%s); serving a tiny random model instead", spec.source, exc)
        return load_generator(str(path), label=label, **options)


def start(settings: Settings, hostname: str | None = None) -> Resident:
    """Load corpus, index and model, warm the model up, start the batcher, and keep them for this process."""
    global _resident
    spec = settings.worker_spec
    template = check_template(settings.read_prompt_template() or DEFAULT_TEMPLATE)
    documents = load_documents(settings.documents, settings.data_dir)
    retriever = Retriever(documents)
    generator = load_model(spec, settings)
    generator.warm_up()
    caps = batch_settings(settings)
    store = JobStore(connect(settings.effective_redis_url, threads=caps.thread_pool_size), settings.result_ttl_s)
    hostname = hostname or socket.gethostname()
    limits = BatchLimits(BatchCap(caps.max_batch_size), caps.max_batch_tokens)
    resident = Resident(settings, spec, store, retriever, generator, template, hostname, limits, ledger=Ledger(settings.execution_ledger))
    interactive_queue = redis_keys.model_queue(spec.name)
    resident.batcher = Batcher(
        resident.run_batch,
        caps.max_batch_size,
        caps.batch_wait_ms,
        HANDOFF_MS,
        interactive_waiting=lambda: bool(store.redis.llen(interactive_queue)),
    )
    # Keep a few batches' worth of backlog items on the queue: enough to fill batches, shallow enough that a
    # newly submitted batch starts within seconds.
    resident.duties = start_duties(settings, store, hostname, FEED_BATCHES * caps.max_batch_size)
    _resident = resident
    # `ragq serve` and the tests wait for this before sending work.
    announce_worker(store.redis, f"{hostname}:{os.getpid()}", spec.name)
    log.info("ragq worker ready: model %s, %d documents, batches of up to %d", spec.name, len(documents), caps.max_batch_size)
    return resident


def note_reserved(settings: Settings, worker: str, job_id: str) -> None:
    """Record that `worker` holds the message of `job_id` (see `Housekeeper.reap_dead_workers`)."""
    client = current(settings).store.redis
    pipe = client.pipeline(transaction=False)
    pipe.sadd(redis_keys.worker_jobs(worker), job_id)
    pipe.sadd(redis_keys.workers_with_jobs(), worker)
    pipe.execute()


def current(settings: Settings) -> Resident:
    """This process's resident state, loading it on first use if the worker's start-up signal did not."""
    with _start_lock:
        return _resident if _resident is not None else start(settings)
