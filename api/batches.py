"""`/v1/batches`: submit a backlog (JSONL, CSV or JSON), watch it, cancel it, stream its results."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, jsonify, request, stream_with_context, url_for

from api import idempotency, state, tenancy
from shared.batch_store import BatchStore, encode_result
from shared.batches import Batch, batch_items, parse_batch
from shared.errors import ValidationFailed
from shared.netguard import non_public_reason
from shared.jobs import JobStatus

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")

JSON_QUERY_OPTIONS = ("metadata", "params")
MAX_PAGE = 100


def batch_store() -> BatchStore:
    return BatchStore(state.get().store)


@bp.post("")
def create() -> tuple[Response, int, dict[str, str]]:
    """Validate every line, then store the batch and its items; 202 with the batch object."""
    api = state.get()
    # Batches may be far larger than single-job bodies.
    request.max_content_length = api.settings.max_batch_bytes
    body = request.get_data(cache=False)
    fingerprint = idempotency.fingerprint(body)
    store = batch_store()
    earlier = idempotency.replayed_id("batch", fingerprint)
    if earlier is not None:
        return _replayed(store.public(earlier, tenancy.tenant()))
    parsed = parse_batch(body, request.content_type or "", query_options(), api.requests, api.settings.max_batch_lines)
    options: Any = parsed.options
    if options.callback_url and not api.settings.callback_secret:
        raise ValidationFailed("callback_url needs RAGQ_CALLBACK_SECRET to be configured on the server (callbacks are signed)")
    if options.callback_url:
        problem = non_public_reason(options.callback_url, api.settings.callback_ports, api.settings.callback_allow_private)
        if problem:
            raise ValidationFailed(f"callback_url {problem}; see RAGQ_CALLBACK_ALLOW_PRIVATE", details=[{"field": "callback_url"}])
    batch = Batch.new(
        model=options.model or api.settings.default_model.name,
        total=len(parsed.lines),
        completion_window=options.completion_window,
        metadata=options.metadata,
        callback_url=options.callback_url,
        tenant=tenancy.tenant(),
    )
    items = batch_items(parsed)
    try:
        with tenancy.outstanding(batch.total), idempotency.reserve(
            "batch", batch.id, fingerprint, lambda batch_id: store.public(batch_id, tenancy.tenant())
        ):
            store.create(batch, items)
    except idempotency.Replay as replay:
        return _replayed(replay.obj)  # type: ignore[arg-type]
    return jsonify(store.public(batch.id, batch.tenant)), 202, {"Location": url_for("batches.read", batch_id=batch.id)}


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
    store = batch_store()
    store.get(batch_id, tenancy.tenant())  # 404 before the stream starts
    lines = (encode_result(result) for result in store.results(batch_id, wanted, tenancy.tenant()))
    return Response(stream_with_context(lines), mimetype="application/x-ndjson")
