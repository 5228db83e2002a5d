"""`/v1/jobs`: submit, read (with long-poll), cancel."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pydantic
import redis
from flask import Blueprint, Response, jsonify, request, url_for

from api import idempotency, state, tenancy
from api import metrics as api_metrics
from shared.broker import enqueue, mark_sent
from shared.config import MAX_WAIT_S
from shared.errors import BadRequest, Conflict, NotFound, Unavailable, ValidationFailed
from shared.jobs import Job, JobRequestBase, JobStatus
from shared.redis_client import wait_for_replicas

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")


@bp.post("")
def submit() -> tuple[Response, int, dict[str, str]]:
    """Validate, store and enqueue a job; 202 with the job and its Location."""
    api = state.get()
    body = read_body()
    fingerprint = idempotency.fingerprint(body)
    earlier = idempotency.replayed_id("job", fingerprint)
    if earlier is not None:
        return _replayed(owned_job(earlier).to_public())
    job_request = validate(api.requests.job, parse_json(body))
    job = Job.new(job_request, api.settings.default_model.name, tenant=tenancy.tenant())
    try:
        with tenancy.outstanding(1) as reservation, idempotency.reserve(
            "job", job.id, fingerprint, lambda job_id: owned_job(job_id).to_public()
        ):
            store_and_enqueue(job, reservation)
        api_metrics.jobs_submitted(job.model, "job")
    except idempotency.Replay as replay:
        return _replayed(replay.obj)  # type: ignore[arg-type]
    # Outside the blocks above: a job whose replicas are late stays stored, quota and Idempotency-Key included, so
    # a retry with the same key gets this job back instead of a second one.
    confirm_replicated(job_id=job.id)
    return jsonify(job.to_public()), 202, {"Location": url_for("jobs.read", job_id=job.id)}


def confirm_replicated(**ids: str) -> None:
    """Return once RAGQ_REDIS_MIN_REPLICAS_ACKED replicas hold what this request stored: an accepted submission then
    survives a failover (docs/design.md "Failover"). 503 `replicas_not_acked`, naming `ids`, if they do not in time."""
    api = state.get()
    try:
        wait_for_replicas(api.store.redis, api.settings.redis_min_replicas_acked, api.settings.redis_replica_ack_timeout_ms)
    except Unavailable as exc:
        exc.details = {**exc.details, **ids}
        raise


def _replayed(job: dict[str, Any]) -> tuple[Response, int, dict[str, str]]:
    return jsonify(job), 200, {"Idempotent-Replayed": "true", "Location": url_for("jobs.read", job_id=job["id"])}


def store_and_enqueue(job: Job, reservation: tenancy.Reservation) -> None:
    """Store the job, then put it on its model's queue; undo the store if the enqueue fails."""
    api = state.get()
    # Noted before the record exists: if this process dies between storing and sending, the message audit
    # sends the job's message; if it dies before storing, the audit drops the note.
    sent_at = mark_sent(api.store.redis, job.model, [job.id])
    api.store.create(job)
    try:
        enqueue(api.celery, api.store.redis, job.id, job.model, sent_at=sent_at)
    except Exception as exc:
        # Leave nothing half-written: a stored job that no worker will ever see is worse than none.
        try:
            api.store.delete(job.id)
        except Exception:
            # The job stays, and the message audit will send it: it keeps its place in the quota.
            reservation.keep()
        if reservation.kept:
            message = "Redis failed while the job was being queued; it is stored and may still run"
            raise Unavailable(message, details={"job_id": job.id}) from exc
        if isinstance(exc, redis.exceptions.OutOfMemoryError):
            raise Unavailable("the job store (Redis) is full; retry later") from exc
        raise Unavailable("the queue (Redis) is unavailable; the job was not accepted") from exc


@bp.get("/<job_id>")
def read(job_id: str) -> dict[str, Any]:
    """The job; `?wait=N` blocks up to N seconds until it is finished."""
    wait_s = parse_wait(request.args.get("wait"))
    job = owned_job(job_id)
    if wait_s > 0 and not job.status.is_final:
        api = state.get()
        with api.events.slot(tenancy.tenant()):
            job = api.store.wait_until_final(job_id, wait_s, api.events)
    return job.to_public()


@bp.delete("/<job_id>")
def cancel(job_id: str) -> dict[str, Any]:
    """Cancel a queued or running job; 409 if it has already finished."""
    store = state.get().store
    owned_job(job_id)
    outcome = store.transition(job_id, JobStatus.CANCELLED, finished_at=time.time())
    if outcome.previous is None:
        raise NotFound(f"no job with id {job_id!r}")
    if not outcome.applied:
        raise Conflict(f"job is already {outcome.previous.value}", details={"status": outcome.previous.value})
    return store.get(job_id).to_public()


def read_body() -> bytes:
    """The raw JSON request body (400 unless the Content-Type is JSON)."""
    if not request.is_json:
        raise BadRequest("Content-Type must be application/json")
    return request.get_data(cache=False)


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or a 400 that says why not."""
    try:
        return json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and an integer of over 4,300 digits
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadRequest("request body is not valid JSON: nested too deeply") from exc


def validate(model: type[JobRequestBase], data: Any) -> JobRequestBase:
    """Validate `data` against `model`; 422 listing every problem."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        details = [
            {"field": ".".join(str(p) for p in err["loc"]) or "(body)", "message": err["msg"], "type": err["type"]}
            for err in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
        raise ValidationFailed("request is invalid", details=details) from exc


def parse_wait(raw: str | None) -> float:
    """`?wait=` in seconds, 0..MAX_WAIT_S."""
    if raw is None:
        return 0.0
    try:
        wait_s = float(raw)
    except ValueError:
        wait_s = -1.0
    if not 0 <= wait_s <= MAX_WAIT_S:
        raise ValidationFailed(f"wait must be a number of seconds between 0 and {MAX_WAIT_S}", details={"wait": raw})
    return wait_s


def owned_job(job_id: str) -> Job:
    """The job, if it belongs to the calling tenant; another tenant's job is as unknown as a missing one."""
    job = state.get().store.get(checked_id(job_id))
    if job.tenant != tenancy.tenant():
        raise NotFound(f"no job with id {job_id!r}")
    return job


def checked_id(job_id: str) -> str:
    """Job ids are UUIDs; anything else cannot name a job."""
    try:
        uuid.UUID(job_id)
    except ValueError:
        raise NotFound(f"no job with id {job_id!r}") from None
    return job_id
