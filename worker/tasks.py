"""The Celery task: a thin shell around the pipeline that moves the job through its states."""

from __future__ import annotations

import logging
import time
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded

from shared.jobs import JobStatus
from worker import pipeline
from worker.generation import GenerationError
from worker.runtime import Resident

log = logging.getLogger(__name__)


def run_job(resident: Resident, job_id: str, worker_name: str) -> JobStatus | None:
    """Claim, answer and finish one job; returns the final status it wrote, or None when it skipped the job."""
    store = resident.store
    started_at = time.time()
    claim = store.transition(job_id, JobStatus.RUNNING, started_at=started_at, worker=worker_name)
    if not claim.applied:
        # Cancelled before pick-up, already finished (a redelivered message), or expired.
        log.info("skipping job %s: status is %s", job_id, claim.previous)
        return None
    job = store.get(job_id)
    if job.model != resident.spec.name:
        return _fail(resident, job_id, started_at, "wrong_model", f"job is for model {job.model!r}, worker serves {resident.spec.name!r}")
    question = pipeline.Question(question=job.question, course=job.course, top_k=job.top_k, params=job.params)
    try:
        result = pipeline.answer(question, resident.retriever, resident.generator, resident.template)
    except SoftTimeLimitExceeded:
        return _fail(resident, job_id, started_at, "timeout", f"job ran longer than {resident.settings.task_time_limit_s} s")
    except GenerationError as exc:
        return _fail(resident, job_id, started_at, "generation_error", str(exc))
    except Exception as exc:  # one job's failure must never take the worker down
        log.exception("job %s failed", job_id)
        return _fail(resident, job_id, started_at, "internal_error", f"{type(exc).__name__}: {exc}")
    finished_at = time.time()
    outcome = store.transition(
        job_id,
        JobStatus.SUCCEEDED,
        answer=result.text,
        sources=result.sources,
        finished_at=finished_at,
        served_by=resident.generator.label,
        timings=_timings(job.created_at, started_at, finished_at, result.retrieval_ms, result.generation_ms),
        usage={"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
    )
    if not outcome.applied:
        log.info("result of job %s discarded: status became %s meanwhile", job_id, outcome.previous)
        return None
    return JobStatus.SUCCEEDED


def _fail(resident: Resident, job_id: str, started_at: float, error_type: str, message: str) -> JobStatus | None:
    finished_at = time.time()
    job = resident.store.get(job_id)
    outcome = resident.store.transition(
        job_id,
        JobStatus.FAILED,
        error={"type": error_type, "message": message},
        finished_at=finished_at,
        served_by=resident.generator.label,
        timings=_timings(job.created_at, started_at, finished_at, None, None),
    )
    return JobStatus.FAILED if outcome.applied else None


def _timings(
    created_at: float, started_at: float, finished_at: float, retrieval_ms: float | None, generation_ms: float | None
) -> dict[str, Any]:
    return {
        "queue_ms": round((started_at - created_at) * 1000, 3),
        "retrieval_ms": None if retrieval_ms is None else round(retrieval_ms, 3),
        "generation_ms": None if generation_ms is None else round(generation_ms, 3),
        "total_ms": round((finished_at - created_at) * 1000, 3),
    }
