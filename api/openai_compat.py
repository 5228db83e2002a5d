"""OpenAI's API on ragq: batches from an uploaded file (`input_file_id`) and `POST /v1/chat/completions`.

Requests keep OpenAI's shapes so that a script written for the OpenAI SDK runs unchanged but for `base_url`
and the API key; the mapping itself lives in `shared.openai_shapes`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Annotated, Any

import pydantic
from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api import jobs as jobs_api
from api import state, tenancy
from api.errors import error_response
from shared import openai_shapes
from shared.batch_store import BatchStore
from shared.batches import Batch, _LineErrors
from shared.errors import BadRequest, NotFound, PayloadTooLarge, Unavailable, ValidationFailed
from shared.files import FileStore
from shared.jobs import COMPLETION_WINDOW, MAX_METADATA_KEYS, Job, JobStatus
from shared.openai_shapes import ChatRefused, Rejected
from shared.overview import live_workers
from shared.store import ready_workers

bp = Blueprint("openai", __name__, url_prefix="/v1")

# A batch's metadata key naming the course every line retrieves from (a line's own `body.course` wins).
COURSE_METADATA_KEY = "course"


class FileBatchRequest(BaseModel):
    """Body of `POST /v1/batches` in OpenAI's form."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input_file_id: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    endpoint: str
    completion_window: Annotated[str, StringConstraints(pattern=COMPLETION_WINDOW)] = "24h"
    metadata: dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]] | None = Field(
        None, max_length=MAX_METADATA_KEYS
    )


def file_batch(document: dict[str, Any], batch_id: str, tenant: str) -> tuple[Batch, Iterator[list[Any] | Rejected]]:
    """The batch record and its item rows for OpenAI's `{"input_file_id", "endpoint", ...}` body.

    The file's lines must each be `{"custom_id", "method", "url", "body"}` with unique custom_ids, or the file is
    refused whole (422 naming the lines). A well-formed line ragq cannot run as asked (an unsupported parameter,
    url or model) becomes a failed item: it is in the error file, not silently dropped.
    """
    api = state.get()
    try:
        options = FileBatchRequest.model_validate(document)
    except pydantic.ValidationError as exc:
        raise ValidationFailed("batch request is invalid", details=_details(exc)) from exc
    if options.endpoint not in openai_shapes.ENDPOINTS:
        raise BadRequest(f"endpoint {options.endpoint!r} is not supported; ragq serves {', '.join(openai_shapes.ENDPOINTS)}")
    files = FileStore(api.store.redis)
    stored = files.get(options.input_file_id, tenant)
    if stored.purpose != "batch":
        raise BadRequest(f"file {stored.id} has purpose {stored.purpose!r}, not 'batch'")
    batch_model = _batch_model(files, stored.id)
    batch = Batch.new(
        model=batch_model, total=0, completion_window=options.completion_window, metadata=options.metadata,
        callback_url=None, tenant=tenant, batch_id=batch_id,
    )
    batch = dataclasses.replace(batch, input_file_id=stored.id, endpoint=options.endpoint)
    course = (options.metadata or {}).get(COURSE_METADATA_KEY)
    return batch, _rows(files, stored.id, batch_model, course)


def _batch_model(files: FileStore, file_id: str) -> str:
    """The model of the file's first line naming a served one (OpenAI batches have one model); else the default."""
    api = state.get()
    for _, raw in files.lines(file_id):
        try:
            model = json.loads(raw).get("body", {}).get("model")
        except (ValueError, AttributeError):
            continue
        if model in api.settings.model_names:
            return str(model)
    return api.settings.default_model.name


def _rows(files: FileStore, file_id: str, batch_model: str, course: str | None) -> Iterator[list[Any] | Rejected]:
    api = state.get()
    errors = _LineErrors()
    seen: dict[str, int] = {}
    count = 0
    for number, raw in files.lines(file_id):
        count += 1
        if count > api.settings.max_batch_lines:
            raise PayloadTooLarge(f"a batch may hold at most {api.settings.max_batch_lines} lines; this one has more")
        try:
            line = openai_shapes.parse_line(raw)
        except pydantic.ValidationError as exc:
            errors.add(number, "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False, include_input=False)))
            continue
        except (ValueError, RecursionError, AttributeError, TypeError) as exc:
            errors.add(number, f"not a JSON object: {exc}")
            continue
        if line.custom_id in seen:
            errors.add(number, f"duplicate custom_id {line.custom_id!r} (first on line {seen[line.custom_id]})")
            continue
        seen[line.custom_id] = number
        if not errors.count:
            yield openai_shapes.line_to_row(line, api.requests, batch_model, course)
    errors.raise_if_any()
    if not count:
        raise ValidationFailed("the input file has no lines")


def _details(exc: pydantic.ValidationError) -> list[dict[str, str]]:
    return [
        {"field": ".".join(str(p) for p in err["loc"]) or "(body)", "message": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


@bp.post("/chat/completions")
def chat_completions() -> Any:
    """One question answered synchronously through the queue (interactive priority), as a `chat.completion`."""
    api = state.get()
    body = jobs_api.parse_json(jobs_api.read_body())
    try:
        job_request = openai_shapes.chat_to_job_fields(body, api.requests)
    except ChatRefused as refused:
        raise BadRequest(refused.message, details={"code": refused.type}) from None
    job = Job.new(job_request, api.settings.default_model.name, tenant=tenancy.tenant())
    if not _served_now(job.model):
        raise Unavailable(f"no worker serves model {job.model!r} now; retry later", details={"model": job.model})
    with api.events.slot(tenancy.tenant()):
        with tenancy.outstanding(1) as reservation:
            jobs_api.store_and_enqueue(job, reservation)
        done = api.store.wait_until_final(job.id, api.settings.chat_timeout_s, api.events)
    if not done.status.is_final:
        if api.store.transition(job.id, JobStatus.CANCELLED, finished_at=time.time()).applied:
            return error_response(
                504, "timeout", f"no answer within {api.settings.chat_timeout_s} s (RAGQ_CHAT_TIMEOUT_S); the job was cancelled",
                details={"job_id": job.id},
            )
        done = api.store.get(job.id)  # it ended between the wait and the cancel
    if done.status is JobStatus.SUCCEEDED:
        return jsonify(openai_shapes.chat_completion(done))
    if done.status is JobStatus.CANCELLED:
        return error_response(409, "conflict", "the job was cancelled (DELETE /v1/jobs/<id>)", details={"job_id": job.id})
    error = done.error or {"type": "error", "message": done.status.value}
    return error_response(500, error.get("type", "error"), error.get("message", ""), details={"job_id": job.id, "status": done.status.value})

def _served_now(model: str) -> bool:
    """Whether a live worker serves `model` (by the worker registry, or a start announced since Redis was emptied):
    a synchronous call for a model nobody serves is a 503 at once, not a wait until the timeout."""
    client = state.get().store.redis
    return ready_workers(client, 0, model) > 0 or any(worker.get("model") == model for worker in live_workers(client))


def output_content(batch_id: str, kind: str, tenant: str) -> Iterator[bytes]:
    """A batch's output (`kind` "output") or error file, one OpenAI-shaped JSON line per item, made as it is read."""
    store = BatchStore(state.get().store)
    batch, _ = store.get(batch_id, tenant)
    if batch.input_file_id is None or not batch.status.has_ended:
        raise NotFound(f"no file for batch {batch_id!r}")
    for job in store.jobs_of(batch_id):
        if kind == "output" and job.status is JobStatus.SUCCEEDED:
            yield _encode(openai_shapes.output_line(job))
        elif kind == "error" and job.status in (JobStatus.FAILED, JobStatus.EXPIRED, JobStatus.CANCELLED):
            yield _encode(openai_shapes.error_line(job))


def _encode(line: dict[str, Any]) -> bytes:
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"

