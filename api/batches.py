"""`/v1/batches`: submit a backlog (JSONL, CSV or JSON), watch it, cancel it, stream its results."""

from __future__ import annotations

import dataclasses
import io
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context, url_for

from api import idempotency, openai_compat, retries, state, tenancy
from api import metrics as api_metrics
from api.jobs import confirm_replicated
from shared import batch_store as batch_store_module
from shared.batch_store import BatchLimits, BatchStore, IdempotencyClaim, encode_result
from shared.batches import (
    MAX_WINDOW_S,
    Batch,
    document_submission,
    item_rows,
    new_batch_id,
    open_submission,
    read_json_document,
)
from shared.errors import Unavailable, ValidationFailed
from shared.jobs import JobStatus
from shared.netguard import non_public_reason
from shared.openai_shapes import Rejected

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")

JSON_QUERY_OPTIONS = ("metadata", "params", "evaluate")
MAX_PAGE = 100


def batch_store() -> BatchStore:
    return BatchStore(state.get().store)


@bp.post("")
def create() -> tuple[Response, int, dict[str, str]]:
    """Read the upload as a stream, validating each line and staging the items in chunks; then store the batch
    whole or not at all; 202 with the batch object."""
    api = state.get()
    # Batches may be far larger than single-job bodies.
    request.max_content_length = api.settings.max_batch_bytes
    tenant = tenancy.tenant()
    store = batch_store()
    with upload_slot():
        body = _HashingReader(request.stream, idempotency.fingerprint_start())
        stream = io.BufferedReader(body, buffer_size=READ_BUFFER_BYTES)
        batch_id = new_batch_id()
        try:
            with idempotency.claim_pending(
                "batch", batch_id, lambda: body.drain(stream), lambda found: store.public(found, tenant)
            ) as claim:
                batch, rows = _read_submission(stream, batch_id, tenant)
                store.check_quota(tenant, 1, limits())
                store_rows(store, batch, rows, claim, lambda: body.drain(stream))
                api_metrics.jobs_submitted(batch.model, "batch_item", batch.total)
        except idempotency.Replay as replay:
            return _replayed(replay.obj)  # type: ignore[arg-type]
    confirm_replicated(batch_id=batch.id)
    return jsonify(store.public(batch.id, tenant)), 202, {"Location": url_for("batches.read", batch_id=batch.id)}


def _read_submission(stream: io.BufferedReader, batch_id: str, tenant: str) -> tuple[Batch, Iterable[list[Any] | Rejected]]:
    """The batch record and its item rows (read lazily) for any accepted body: JSONL, CSV, JSON, or OpenAI's
    `{"input_file_id", ...}` naming an uploaded file."""
    api = state.get()
    content_type = request.content_type or ""
    if content_type.split(";")[0].strip().lower() == "application/json":
        document = read_json_document(stream)
        if isinstance(document, dict) and "input_file_id" in document:
            if request.args:
                raise ValidationFailed("a batch from input_file_id takes its options in the body, not the query string")
            return openai_compat.file_batch(document, batch_id, tenant)
        submission = document_submission(document, query_options(), api.requests)
    else:
        submission = open_submission(stream, content_type, query_options(), api.requests)
    batch = _new_batch(submission.options, batch_id, tenant)
    return batch, item_rows(submission, api.requests, api.settings.max_batch_lines)


def store_rows(
    store: BatchStore,
    batch: Batch,
    rows: Iterable[list[Any] | Rejected],
    claim: IdempotencyClaim | None,
    fingerprint: Callable[[], str],
) -> None:
    """Stage the items chunk by chunk as the lines are validated (refused lines as failed items, in input order),
    then commit; anything staged goes if it fails. `fingerprint` finishes reading the request and hashes it."""
    written: list[str] = []
    chunk: list[list[Any]] = []
    refused: list[Rejected] = []
    rejected = 0
    try:
        for row in rows:
            if isinstance(row, Rejected):
                if chunk:
                    written += store.stage(batch, chunk)
                    chunk = []
                refused.append(row)
                rejected += 1
            else:
                if refused:
                    written += store.stage_rejected(batch, refused)
                    refused = []
                chunk.append(row)
            if len(chunk) == batch_store_module.CHUNK:
                written += store.stage(batch, chunk)
                chunk = []
            if len(refused) == batch_store_module.CHUNK:
                written += store.stage_rejected(batch, refused)
                refused = []
        if chunk:
            written += store.stage(batch, chunk)
        if refused:
            written += store.stage_rejected(batch, refused)
        if rejected == len(written):
            raise ValidationFailed("no line of the batch can run; nothing was created", details={"refused_lines": rejected})
        batch.total = len(written)
        final = dataclasses.replace(claim, final=idempotency.final_entry(batch.id, fingerprint())) if claim else None
        store.commit(batch, limits(), final, rejected)
    except BaseException:
        store.discard(batch.id, written)
        raise


READ_BUFFER_BYTES = 1 << 16


class _HashingReader(io.RawIOBase):
    """The request body as a raw binary stream, hashed as it is read (the Idempotency-Key fingerprint)."""

    def __init__(self, source: IO[bytes], digest: Any) -> None:
        self.source = source
        self.digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.source.read(len(buffer))
        self.digest.update(data)
        buffer[: len(data)] = data
        return len(data)

    def drain(self, stream: io.BufferedReader) -> str:
        """Read what is left of the body (through `stream`, its buffered reader) and return the fingerprint."""
        while stream.read(READ_BUFFER_BYTES):
            pass
        return str(self.digest.hexdigest())


def _new_batch(batch_options: Any, batch_id: str, tenant: str) -> Batch:
    """The batch record for validated batch options (its callback URL checked); its total is set once read."""
    api = state.get()
    options: Any = batch_options
    if options.callback_url and not api.settings.callback_secret:
        raise ValidationFailed("callback_url needs RAGQ_CALLBACK_SECRET to be configured on the server (callbacks are signed)")
    if options.callback_url:
        problem = non_public_reason(options.callback_url, api.settings.callback_ports, api.settings.callback_allow_private)
        if problem:
            raise ValidationFailed(f"callback_url {problem}; see RAGQ_CALLBACK_ALLOW_PRIVATE", details=[{"field": "callback_url"}])
    return Batch.new(
        model=options.model or api.settings.default_model.name,
        total=0,
        completion_window=options.completion_window,
        metadata=options.metadata,
        callback_url=options.callback_url,
        tenant=tenant,
        batch_id=batch_id,
        evaluate=options.evaluate,
    )


def limits() -> BatchLimits:
    """The tenant limits a new batch must fit, from the settings."""
    settings = state.get().settings
    return BatchLimits(
        max_outstanding_jobs=settings.max_outstanding_jobs,
        max_open_batches=settings.max_open_batches,
        max_stored_items=settings.max_stored_batch_items,
        ended_ttl_s=settings.ended_batch_ttl_s,
        tenant_keys_ttl_s=MAX_WINDOW_S + settings.result_ttl_s,
    )


_SLOTS_LOCK = threading.Lock()


@contextmanager
def upload_slot() -> Iterator[None]:
    """One of this API process's `RAGQ_MAX_CONCURRENT_UPLOADS` places for reading and parsing an upload;
    503 with Retry-After when all are taken, so concurrent uploads cannot exhaust the process's memory."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    with _SLOTS_LOCK:
        slots = app.extensions.get("ragq-upload-slots")
        if slots is None:
            slots = app.extensions["ragq-upload-slots"] = threading.BoundedSemaphore(state.get().settings.max_concurrent_uploads)
    if not slots.acquire(blocking=False):
        raise Unavailable(
            "too many batch uploads are being processed by this server; retry shortly",
            details={"max_concurrent_uploads": state.get().settings.max_concurrent_uploads},
        )
    try:
        yield
    finally:
        slots.release()


def _replayed(obj: dict[str, Any]) -> tuple[Response, int, dict[str, str]]:
    return jsonify(obj), 200, {"Idempotent-Replayed": "true", "Location": url_for("batches.read", batch_id=obj["id"])}


def query_options() -> dict[str, Any]:
    """Batch options given as query parameters (metadata and params as JSON objects)."""
    options: dict[str, Any] = {}
    for name, value in request.args.items():
        if name in JSON_QUERY_OPTIONS:
            try:
                options[name] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValidationFailed(f"query parameter {name} must be a JSON object: {exc}") from exc
        else:
            options[name] = value
    return options


@bp.get("")
def listing() -> dict[str, Any]:
    """Batches, newest first: `?limit=` (1..100, default 20) and `?after=<batch id>` for the next page."""
    try:
        limit = int(request.args.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise ValidationFailed(f"limit must be an integer from 1 to {MAX_PAGE}")
    data, has_more = batch_store().list(tenancy.tenant(), limit, request.args.get("after"))
    return {"object": "list", "data": data, "has_more": has_more}


@bp.get("/<batch_id>")
def read(batch_id: str) -> dict[str, Any]:
    """The batch with its request counts."""
    return batch_store().public(batch_id, tenancy.tenant())


@bp.post("/<batch_id>/cancel")
def cancel(batch_id: str) -> dict[str, Any]:
    """Queued items become cancelled at once; running ones finish; results are kept."""
    return batch_store().cancel(batch_id, tenancy.tenant())


@bp.get("/<batch_id>/results")
def results(batch_id: str) -> Response:
    """Results as JSONL in input order, as they stand now (partial while the batch runs); `?status=` filters."""
    status = request.args.get("status")
    try:
        wanted = None if status is None else JobStatus(status)
    except ValueError:
        raise ValidationFailed(f"status must be one of {', '.join(s.value for s in JobStatus)}") from None
    merged = request.args.get("merged", "false")
    if merged not in ("true", "false"):
        raise ValidationFailed("merged must be true or false")
    store = batch_store()
    store.get(batch_id, tenancy.tenant())  # 404 before the stream starts
    if merged == "true":
        found = retries.merged_results(store, batch_id, tenancy.tenant())
        found = (r for r in found if wanted is None or r["status"] == wanted.value)
    else:
        found = store.results(batch_id, wanted, tenancy.tenant())
    lines = (encode_result(result) for result in found)
    return Response(stream_with_context(lines), mimetype="application/x-ndjson")


@bp.post("/<batch_id>/retry")
def retry(batch_id: str) -> tuple[Response, int, dict[str, str]]:
    """A new batch of this ended batch's failed and expired items (`?error_type=` to choose), linked both ways;
    202 with it. 409 when there is nothing to retry or the batch has not ended."""
    tenant = tenancy.tenant()
    store = batch_store()
    new_id = new_batch_id()
    fingerprint = idempotency.fingerprint(request.get_data(cache=False))
    try:
        with idempotency.claim_pending(
            "batch", new_id, lambda: fingerprint, lambda found: store.public(found, tenant)
        ) as claim:
            batch, rows = retries.retry_rows(store, batch_id, new_id, tenant, request.args.getlist("error_type"))
            store.check_quota(tenant, 1, limits())
            store_rows(store, batch, rows, claim, lambda: fingerprint)
            store.link_retry(batch_id, batch.id)
    except idempotency.Replay as replay:
        return _replayed(replay.obj)  # type: ignore[arg-type]
    confirm_replicated(batch_id=batch.id)
    return jsonify(store.public(batch.id, tenant)), 202, {"Location": url_for("batches.read", batch_id=batch.id)}
