"""Every Redis key and channel ragq uses, built here and nowhere else."""

from __future__ import annotations

PREFIX = "ragq"


def job(job_id: str) -> str:
    """Hash holding one job's record."""
    return f"{PREFIX}:job:{job_id}"


def job_events(job_id: str) -> str:
    """Pub/sub channel announcing each status change of one job (long-polls listen here)."""
    return f"{PREFIX}:job:{job_id}:events"


def model_queue(model_name: str) -> str:
    """Celery queue (a Redis list of the same name) holding the jobs of one served model."""
    return f"{PREFIX}.model.{model_name}"


def workers() -> str:
    """Hash of worker processes that have loaded their model: `hostname:pid` -> JSON {model, ready_at}."""
    return f"{PREFIX}:workers"
