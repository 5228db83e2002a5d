"""`/v1/files`: upload (multipart, `purpose=batch`), list, read, download and delete files, in OpenAI's shape.

Uploads are read as a stream (werkzeug spools a multipart file part to a temporary file past 500 KB) and copied
into Redis in 64 KiB chunks, under the batch body limit (`RAGQ_MAX_BATCH_BYTES`), an upload slot
(`RAGQ_MAX_CONCURRENT_UPLOADS`) and the tenant's caps. A batch's output and error files (`file-out-…`,
`file-err-…`) are not stored: their lines are made from the batch's results as they are read.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request, stream_with_context

from api import state, tenancy
from api.batches import batch_store, upload_slot
from api.jobs import confirm_replicated
from api.openai_compat import output_content
from shared import openai_shapes
from shared.errors import BadRequest, Conflict, ValidationFailed
from shared.files import PURPOSES, FileLimits, FileStore

bp = Blueprint("files", __name__, url_prefix="/v1/files")

MAX_FILENAME_CHARS = 255
MAX_PAGE = 10_000


def file_store() -> FileStore:
    return FileStore(state.get().store.redis)


def _limits() -> FileLimits:
    settings = state.get().settings
    return FileLimits(max_bytes=settings.max_file_bytes_per_tenant, max_files=settings.max_files_per_tenant, ttl_s=settings.file_ttl_s)


@bp.post("")
def upload() -> dict[str, Any]:
    """Store an uploaded file; OpenAI's file object."""
    settings = state.get().settings
    request.max_content_length = settings.max_batch_bytes
    with upload_slot():
        if not (request.content_type or "").startswith("multipart/form-data"):
            raise BadRequest("upload a file as multipart/form-data with fields `file` and `purpose`")
        purpose = request.form.get("purpose")
        if purpose not in PURPOSES:
            raise BadRequest(f"purpose must be one of {', '.join(PURPOSES)}; got {purpose!r}", details={"field": "purpose"})
        part = request.files.get("file")
        if part is None:
            raise BadRequest("the multipart body has no `file` part", details={"field": "file"})
        filename = (part.filename or "upload.jsonl")[:MAX_FILENAME_CHARS]
        stored = file_store().create(tenancy.tenant(), filename, purpose, part.stream, _limits(), settings.max_batch_bytes)
    confirm_replicated(file_id=stored.id)
    return stored.to_public()


@bp.get("")
def listing() -> dict[str, Any]:
    """The tenant's uploaded files, newest first (`?purpose=`, `?limit=` 1..10000)."""
    try:
        limit = int(request.args.get("limit", str(MAX_PAGE)))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise ValidationFailed(f"limit must be an integer from 1 to {MAX_PAGE}")
    data, has_more = file_store().listing(tenancy.tenant(), limit, request.args.get("purpose"))
    return {"object": "list", "data": data, "has_more": has_more}


@bp.get("/<file_id>")
def read(file_id: str) -> dict[str, Any]:
    """The file object (a batch's output or error file included)."""
    of_batch = openai_shapes.batch_of_file(file_id)
    if of_batch is None:
        return file_store().get(file_id, tenancy.tenant()).to_public()
    batch_id, kind = of_batch
    batch, _ = batch_store().get(batch_id, tenancy.tenant())
    size = sum(len(line) for line in output_content(batch_id, kind, tenancy.tenant()))
    return {
        "id": file_id, "object": "file", "bytes": size, "created_at": int(batch.completed_at or batch.created_at),
        "expires_at": None, "filename": f"{batch_id}_{kind}.jsonl", "purpose": f"batch_{kind}", "status": "processed",
        "status_details": None,
    }


@bp.get("/<file_id>/content")
def content(file_id: str) -> Response:
    """The file's bytes; a batch's output or error file is made line by line from its results as it is sent."""
    tenant = tenancy.tenant()
    of_batch = openai_shapes.batch_of_file(file_id)
    if of_batch is None:
        files = file_store()
        files.get(file_id, tenant)  # 404 before the stream starts
        chunks = (chunk.encode() for chunk in files.chunks(file_id))
        return Response(stream_with_context(chunks), mimetype="application/octet-stream")
    lines = output_content(*of_batch, tenant)
    first = next(lines, b"")  # a missing batch is a 404, not a broken stream
    return Response(stream_with_context(_prepend(first, lines)), mimetype="application/jsonl")


def _prepend(first: bytes, rest: Any) -> Any:
    if first:
        yield first
    yield from rest


@bp.delete("/<file_id>")
def delete(file_id: str) -> dict[str, Any]:
    """Delete an uploaded file (batches made from it keep their items); a batch's output files go with the batch."""
    if openai_shapes.batch_of_file(file_id) is not None:
        batch_store().get(openai_shapes.batch_of_file(file_id)[0], tenancy.tenant())  # type: ignore[index]
        raise Conflict("a batch's output and error files are made from its results and go with the batch")
    file_store().delete(file_id, tenancy.tenant())
    return {"id": file_id, "object": "file", "deleted": True}

