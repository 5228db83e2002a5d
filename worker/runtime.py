"""What a worker process keeps resident: settings, job store, retriever, model. Loaded once per process."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from shared.config import Settings
from shared.errors import ModelLoadError
from shared.models import ModelSpec
from shared.prompt import DEFAULT_TEMPLATE, check_template
from shared.store import JobStore, announce_worker, connect
from worker.corpus import load_documents
from worker.generation import Generator, load_generator
from worker.retrieval import Retriever
from worker.tiny import ensure_tiny_model

log = logging.getLogger(__name__)


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


_resident: Resident | None = None


def load_model(spec: ModelSpec, settings: Settings) -> Generator:
    """The model for `spec`, or the tiny stand-in when allowed and the real one cannot be had."""
    try:
        return load_generator(
            spec.source,
            device=settings.device,
            dtype=settings.dtype,
            label=spec.source,
            max_input_tokens=settings.max_input_tokens,
        )
    except ModelLoadError as exc:
        if not settings.fallback_tiny_model:
            raise
        path = ensure_tiny_model(settings.data_dir / "tiny-models" / "t5", "t5")
        label = f"tiny-random-t5 (stand-in for {spec.source}, which could not be loaded; answers are gibberish)"
        log.warning("ragq: %s cannot be loaded (%s); serving a tiny random model instead", spec.source, exc)
        return load_generator(
            str(path), device=settings.device, dtype=settings.dtype, label=label, max_input_tokens=settings.max_input_tokens
        )


def start(settings: Settings, hostname: str | None = None) -> Resident:
    """Load corpus, index and model, warm the model up, and keep them for this process."""
    global _resident
    spec = settings.worker_spec
    template = check_template(settings.read_prompt_template() or DEFAULT_TEMPLATE)
    documents = load_documents(settings.documents, settings.data_dir)
    retriever = Retriever(documents)
    generator = load_model(spec, settings)
    generator.warm_up()
    store = JobStore(connect(settings.effective_redis_url), settings.result_ttl_s)
    hostname = hostname or socket.gethostname()
    _resident = Resident(settings, spec, store, retriever, generator, template, hostname)
    # `ragq serve` and the tests wait for this before sending work.
    announce_worker(store.redis, f"{hostname}:{os.getpid()}", spec.name)
    log.info("ragq worker ready: model %s, %d documents", spec.name, len(documents))
    return _resident


def check_model(spec: ModelSpec) -> str | None:
    """Why `spec`'s model cannot be had (its config cannot be read), or None. Loads no weights."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(spec.source)
    except (OSError, ValueError) as exc:
        return str(exc).splitlines()[0]
    return None


def current(settings: Settings) -> Resident:
    """This process's resident state; loaded on first use in pools that send no process-init signal."""
    return _resident if _resident is not None else start(settings)
