"""A worker's Prometheus metrics, served on `RAGQ_METRICS_PORT` by the worker process (docs/design.md "Metrics").

Everything is measured in the worker process: the engine process's figures (each `generate` call's time and
size, the tokens) come back with its answers over the pipe. The hooks are one-line calls from the worker's
code; each costs a dictionary look-up and an addition, and none can raise into a job's path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from kombu.exceptions import OperationalError
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from shared.config import Settings
from shared.metrics import GENERATE_BUCKETS_S, MICROBATCH_BUCKETS, PORT_TRIES, QUEUE_WAIT_BUCKETS_S, redis_errors_counter

log = logging.getLogger(__name__)

JOBS_FINISHED = Counter(
    "ragq_jobs_finished",
    "Jobs this worker stored as succeeded or failed, or found cancelled or expired when it came to them.",
    ["model", "status"],
)
MICROBATCH_SIZE = Histogram("ragq_microbatch_size", "Jobs per microbatch sent to the model.", ["model"], buckets=MICROBATCH_BUCKETS)
GENERATE_DURATION = Histogram(
    "ragq_generate_duration_seconds", "Duration of one `generate` call (a microbatch makes one per group of settings).",
    ["model"], buckets=GENERATE_BUCKETS_S,
)
PROMPT_TOKENS = Counter("ragq_prompt_tokens", "Prompt tokens of the questions answered.", ["model"])
GENERATED_TOKENS = Counter("ragq_generated_tokens", "Tokens generated in answers.", ["model"])
QUEUE_WAIT = Histogram(
    "ragq_queue_wait_seconds", "From a job's submission (a batch item's: its batch's) to a worker's claim.",
    ["model", "priority"], buckets=QUEUE_WAIT_BUCKETS_S,
)
CALLBACKS = Counter("ragq_callbacks", "Batch callback deliveries by outcome.", ["outcome"])
WORKER_UP = Gauge("ragq_worker_up", "1 while this worker process serves its model.", ["model", "worker"])
ENGINE_RESTARTS = Counter("ragq_engine_restarts", "Engine processes started again after one died.", ["model"])
REDIS_ERRORS = redis_errors_counter()

# The one model this process serves: every hook's `model` label.
_model = "unknown"


def start(settings: Settings, worker_name: str) -> int | None:
    """Serve this process's metrics (the first free port from RAGQ_METRICS_PORT on) and say the worker is up;
    returns the port, None when off or none was free (the worker serves on without metrics)."""
    global _model
    _model = settings.worker_spec.name
    WORKER_UP.labels(_model, worker_name).set(1)
    if settings.metrics_port == 0:
        return None
    for port in range(settings.metrics_port, min(65536, settings.metrics_port + PORT_TRIES)):
        try:
            start_http_server(port, addr=settings.metrics_host)
        except OSError:
            continue  # taken (another worker on this host): the next one
        log.info("ragq worker metrics on http://%s:%d/metrics", settings.metrics_host, port)
        return port
    log.warning("ragq worker: ports %d..%d are all taken; serving without metrics", settings.metrics_port, port)
    return None


def job_claimed(created_at: float, started_at: float, backlog: bool) -> None:
    """A job was claimed: how long it waited since its submission."""
    QUEUE_WAIT.labels(_model, "backlog" if backlog else "interactive").observe(max(0.0, started_at - created_at))


def job_stored(target: Any, outcome: Any) -> None:
    """This worker tried to store a job's final status `target`: counted if it applied; if not, the status the
    job had meanwhile, when it is cancelled or expired."""
    if outcome.applied:
        JOBS_FINISHED.labels(_model, getattr(target, "value", target)).inc()
    else:
        jobs_found_ended([outcome.previous])


def jobs_found_ended(statuses: Iterable[Any]) -> None:
    """Jobs this worker came to (to claim, to run, to store) that had been cancelled or expired meanwhile."""
    for status in statuses:
        value = getattr(status, "value", status)
        if value in ("cancelled", "expired"):
            JOBS_FINISHED.labels(_model, value).inc()


def microbatch_finished(size: int, generated: Sequence[Any]) -> None:
    """A microbatch came back from the model: its size, its `generate` calls, its tokens."""
    if size:
        MICROBATCH_SIZE.labels(_model).observe(size)
    calls = set()
    prompt_tokens = completion_tokens = 0
    for result in generated:
        generation = getattr(result, "generation", None)
        if generation is None:
            continue  # an exception: that job failed alone
        prompt_tokens += generation.prompt_tokens
        completion_tokens += generation.completion_tokens
        # Answers of one call share its measured time and size: the pair names the call.
        calls.add((result.generation_ms, result.call_size))
    for generation_ms, _ in calls:
        GENERATE_DURATION.labels(_model).observe(generation_ms / 1000)
    PROMPT_TOKENS.labels(_model).inc(prompt_tokens)
    GENERATED_TOKENS.labels(_model).inc(completion_tokens)


def callback(delivered: bool) -> None:
    """A batch callback was attempted."""
    CALLBACKS.labels("sent" if delivered else "failed").inc()


def engine_restarted() -> None:
    """The engine process died and was started again."""
    ENGINE_RESTARTS.labels(_model).inc()


def error(exc: BaseException, component: str) -> None:
    """Count `exc` if it is a Redis (or broker) error met by `component`."""
    if isinstance(exc, (redis.RedisError, OperationalError)):
        REDIS_ERRORS.labels(component).inc()
