"""The Celery task's body: claim the job, hand it to the microbatcher, store the outcome. One task per job."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from shared import redis_keys
from shared.jobs import Job, JobStatus
from shared.store import Transition
from shared.usage import job_usage
from worker import metrics as worker_metrics
from worker import pipeline
from worker.microbatcher import BACKLOG, INTERACTIVE, MicrobatchInfo, Skipped
from worker.embeddings import RetrievalUnavailable
from worker.engine_process import EngineCrash, EngineHung
from worker.evaluation import Reference
from worker.generation import GenerationError
from worker.runtime import Resident

log = logging.getLogger(__name__)

T = TypeVar("T")
STORE_RETRY_S = 120
# Redis errors a store waits out (a restart, a failover) instead of giving up a computed answer.
STORE_BLIPS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError)
# What a client learns of an unexpected failure; the worker's log has the exception, under the job's id.
INTERNAL_ERROR_MESSAGE = "the worker could not answer this job because of an internal error; its log has the details"


@dataclass(frozen=True)
class Final:
    """What to store as a job's end: its final status, the fields written with it, and for a failure its error."""

    status: JobStatus
    fields: dict[str, Any]
    error_type: str | None = None
    message: str | None = None


def run_job(resident: Resident, job_id: str, interactive_message: bool = True) -> JobStatus | None:
    """Claim, answer and finish one job; returns the final status it wrote, or None when it skipped the job."""
    started_at = time.time()
    # The microbatcher holds the next backlog microbatch back while an interactive job is on its way to it.
    on_its_way = resident.handoff.interactive_on_its_way(job_id) if interactive_message else nullcontext()
    try:
        with on_its_way:
            # The claim and the read of the job it returns are one script: one round trip.
            claim, job = resident.store.claim(job_id, started_at=started_at, worker=resident.worker_name)
            if job is None:
                # Cancelled before pick-up, already finished (a redelivered message), or expired.
                log.info("skipping job %s: status is %s", job_id, claim.previous)
                worker_metrics.jobs_found_ended([claim.previous])
                resident.store.redis.srem(redis_keys.worker_jobs(resident.worker_name), job_id)
                return None
            future_or_final = start_job(resident, job, started_at)
        if isinstance(future_or_final, Final):
            return store_final(resident, job, future_or_final)
        final = await_final(resident, job, started_at, future_or_final)
        return None if final is None else store_final(resident, job, final)
    finally:
        # Only now is this task's thread about to be free for the next message.
        resident.handoff.task_returned(job_id)


def start_job(resident: Resident, job: Job, started_at: float) -> Future[Any] | Final:
    """A claimed job handed to the microbatcher (its future), or the failure to store at once."""
    resident.ledger.record("run", job.id, resident.worker_name)
    worker_metrics.job_claimed(job.created_at, started_at, job.batch_id is not None)
    if job.attempts > resident.settings.max_attempts:
        # Delivered again after its worker died each time: it may be what kills them.
        message = f"the worker running this job died {job.attempts - 1} times; not retried"
        return failure(resident, job, started_at, "worker_lost", message)
    if job.model != resident.model_name:
        message = f"job is for model {job.model!r}, worker serves {resident.model_name!r}"
        return failure(resident, job, started_at, "wrong_model", message)
    question = pipeline.Question(job.question, job.course, job.top_k, job.params, job.retrieval)
    return resident.microbatcher.submit(job.id, question, BACKLOG if job.batch_id else INTERACTIVE)


def await_final(resident: Resident, job: Job, started_at: float, future: Future[Any]) -> Final | None:
    """Wait for the job's microbatch (at most the task time limit); what to store, or None when it was skipped."""
    limit_s = resident.settings.task_time_limit_s
    try:
        outcome: Any = future.result(timeout=limit_s)
    except FutureTimeout:
        # Not answered yet: leave it out of its microbatch if that has not started.
        future.cancel()
        return failure(resident, job, started_at, "timeout", f"job ran longer than {limit_s} s")
    except Exception as exc:
        outcome = exc
    return final_of(resident, job, started_at, outcome)


def final_of(resident: Resident, job: Job, started_at: float, outcome: Any) -> Final | None:
    """What to store for a job whose microbatch ended with `outcome` (its result or the exception that failed
    it); None when the job was cancelled while it waited for its microbatch."""
    if isinstance(outcome, Skipped):
        log.info("job %s was cancelled while it waited for its microbatch", job.id)
        return None
    if isinstance(outcome, EngineCrash):
        return failure(resident, job, started_at, "engine_crash", str(outcome))
    if isinstance(outcome, EngineHung):
        return failure(resident, job, started_at, "engine_hung", str(outcome))
    if isinstance(outcome, GenerationError):
        return failure(resident, job, started_at, "generation_error", str(outcome))
    if isinstance(outcome, RetrievalUnavailable):
        return failure(resident, job, started_at, outcome.type, outcome.message)
    if isinstance(outcome, BaseException):  # one job's failure must never take the worker down
        # The exception's text (a library's, CUDA's, with addresses and paths) is for the operator's log only.
        log.error("job %s failed: %s: %s", job.id, type(outcome).__name__, outcome)
        return failure(resident, job, started_at, "internal_error", INTERNAL_ERROR_MESSAGE)
    result, microbatch = outcome
    reference = Reference.of(job)
    evaluation = reference.score(resident, result) if reference is not None else None
    return success(resident, job, started_at, result, microbatch, evaluation)


def success(
    resident: Resident,
    job: Job,
    started_at: float,
    result: pipeline.Answer,
    microbatch: MicrobatchInfo,
    evaluation: dict[str, Any] | None = None,
) -> Final:
    finished_at = time.time()
    timings = _timings(job.created_at, started_at, finished_at)
    timings.update(
        retrieval_ms=round(result.retrieval_ms, 3),
        generation_ms=round(result.generation_ms, 3),
        microbatch_wait_ms=round(microbatch.wait_ms, 3),
        microbatch_size=microbatch.size,
    )
    fields = {
        "answer": result.text,
        "sources": result.sources,
        "finished_at": finished_at,
        "served_by": resident.served_by,
        "timings": timings,
        "usage": job_usage(result.prompt_tokens, result.completion_tokens, result.generation_ms, result.call_size),
    }
    if evaluation is not None:
        fields["evaluation"] = evaluation
    return Final(JobStatus.SUCCEEDED, fields)


def failure(resident: Resident, job: Job, started_at: float, error_type: str, message: str) -> Final:
    finished_at = time.time()
    fields = {
        "error": {"type": error_type, "message": message},
        "finished_at": finished_at,
        "served_by": resident.served_by,
        "timings": _timings(job.created_at, started_at, finished_at),
    }
    return Final(JobStatus.FAILED, fields, error_type, message)


def store_final(resident: Resident, job: Job, final: Final) -> JobStatus | None:
    """Store `final` (one transition); the status written, or None when the job had ended meanwhile."""
    outcome = _store_final(resident, job.id, lambda: resident.store.transition(job.id, final.status, **final.fields))
    return recorded(resident, job, final, outcome)


def recorded(resident: Resident, job: Job, final: Final, outcome: Transition) -> JobStatus | None:
    """Metrics, the worker's activity counts and the ledger for a stored final status."""
    worker_metrics.job_stored(final.status, outcome)
    if not outcome.applied:
        log.info("result of job %s discarded: status became %s meanwhile", job.id, outcome.previous)
        return None
    # The ledger first: a client that saw the result may read it at once (tests compare it with the results).
    resident.ledger.record("result", job.id, resident.worker_name, status=final.status.value)
    if final.status is JobStatus.SUCCEEDED:
        resident.duties.activity.succeeded(job)
    else:
        resident.duties.activity.failed(job, final.error_type or "internal_error", final.message or "")
    return final.status


def _store_final(resident: Resident, job_id: str, finish: Callable[[], Transition]) -> Transition:
    """Store a final status; if Redis lost this worker's claim (a crash inside its fsync window), claim again first."""
    outcome = _retrying(finish)
    if not outcome.applied and outcome.previous is JobStatus.QUEUED:
        log.warning("job %s was queued again under us (Redis lost the claim); claiming it again", job_id)
        _retrying(lambda: resident.store.transition(job_id, JobStatus.RUNNING, worker=resident.worker_name))
        outcome = _retrying(finish)
    return outcome


def _retrying(operation: Callable[[], T]) -> T:
    """Run a store operation, waiting out a Redis restart: a computed answer is not thrown away for a blip.

    If Redis stays away longer, the error propagates; the message, never acknowledged, is redelivered.
    """
    delay_s = 0.2
    deadline = time.monotonic() + STORE_RETRY_S
    while True:
        try:
            return operation()
        except STORE_BLIPS as exc:
            worker_metrics.error(exc, "store")
            if time.monotonic() > deadline:
                raise
            time.sleep(delay_s)
            delay_s = min(2.0, delay_s * 2)


def _timings(created_at: float, started_at: float, finished_at: float) -> dict[str, Any]:
    return {
        "queue_ms": round((started_at - created_at) * 1000, 3),
        "total_ms": round((finished_at - created_at) * 1000, 3),
    }
