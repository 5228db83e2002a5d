"""The OpenAPI paths and schemas of the OpenAI-compatible routes (`/v1/files`, `/v1/chat/completions`) and of
batch retries, spliced into `api.openapi`'s document."""

from __future__ import annotations

from typing import Any

from shared.files import PURPOSES
from shared.openai_shapes import SUPPORTED

REF = "#/components/schemas/{model}"


def _ref(model: str) -> dict[str, str]:
    return {"$ref": REF.format(model=model)}


def _json(description: str, model: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, "Error")


def _batch(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"anyOf": [_ref("BatchView"), _ref("OpenAIBatchView")]}}}}


FILE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object", "bytes", "created_at", "filename", "purpose", "status"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "file"},
        "bytes": {"type": "integer"},
        "created_at": {"type": "integer"},
        "expires_at": {"type": ["integer", "null"]},
        "filename": {"type": "string"},
        "purpose": {"type": "string"},
        "status": {"type": "string"},
        "status_details": {"type": ["string", "null"]},
    },
}
CHAT_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "object", "required": ["role", "content"], "properties": {"role": {"type": "string"}, "content": {}}},
        },
        "max_tokens": {"type": "integer"},
        "max_completion_tokens": {"type": "integer"},
        "temperature": {"type": "number"},
        "top_p": {"type": "number"},
        "n": {"const": 1},
        "stream": {"const": False},
        "course": {"type": "string", "description": "ragq's extension: only retrieve FAQ entries of this course."},
        "top_k": {"type": "integer", "description": "ragq's extension: FAQ entries to retrieve."},
    },
    "description": f"OpenAI's chat-completion request; only {', '.join(sorted(SUPPORTED))} are accepted.",
}
CHAT_COMPLETION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array"},
        "usage": {"type": "object"},
        "ragq": {"type": "object", "description": "job_id, sources (the retrieved FAQ entries), served_by"},
    },
}


def schemas() -> dict[str, Any]:
    """Component schemas these paths name."""
    return {
        "File": FILE_SCHEMA,
        "FileList": {
            "type": "object",
            "required": ["object", "data", "has_more"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("File")}, "has_more": {"type": "boolean"}},
        },
        "ChatCompletionRequest": CHAT_REQUEST_SCHEMA,
        "ChatCompletion": CHAT_COMPLETION_SCHEMA,
    }


def paths() -> dict[str, Any]:
    """`/v1/files…`, `/v1/chat/completions` and `/v1/batches/{batch_id}/retry`."""
    file_id = {"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}
    batch_id = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
    not_found = _error("No such file (or another tenant's)")
    return {
        "/v1/files": {
            "post": {
                "summary": "Upload a file (multipart: `file`, `purpose=batch`)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["file", "purpose"],
                                "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"enum": list(PURPOSES)}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json("The stored file", "File"),
                    "400": _error("Not multipart, no file part, or a purpose other than batch"),
                    "413": _error("Larger than RAGQ_MAX_BATCH_BYTES"),
                    "422": _error("Not UTF-8 text"),
                },
            },
            "get": {
                "summary": "The tenant's uploaded files, newest first",
                "parameters": [
                    {"name": "purpose", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
                ],
                "responses": {"200": _json("Files", "FileList"), "422": _error("Bad limit")},
            },
        },
        "/v1/files/{file_id}": {
            "get": {"summary": "A file object (a batch's output and error files too)", "parameters": [file_id],
                    "responses": {"200": _json("The file", "File"), "404": not_found}},
            "delete": {
                "summary": "Delete an uploaded file",
                "parameters": [file_id],
                "responses": {
                    "200": {"description": "`{id, object: file, deleted: true}`", "content": {"application/json": {"schema": {"type": "object"}}}},
                    "404": not_found,
                    "409": _error("A batch's output or error file (it goes with its batch)"),
                },
            },
        },
        "/v1/files/{file_id}/content": {
            "get": {
                "summary": "The file's bytes; a batch's output or error file as OpenAI-shaped JSONL",
                "parameters": [file_id],
                "responses": {
                    "200": {
                        "description": "The content",
                        "content": {"application/octet-stream": {"schema": {"type": "string"}}, "application/jsonl": {"schema": {"type": "string"}}},
                    },
                    "404": not_found,
                },
            }
        },
        "/v1/chat/completions": {
            "post": {
                "summary": "Answer one question synchronously through the queue (interactive priority)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ChatCompletionRequest")}}},
                "responses": {
                    "200": _json("The answer", "ChatCompletion"),
                    "400": _error("Not JSON, or a parameter ragq does not support (stream, tools, n > 1, ...)"),
                    "413": _error("Body too large"),
                    "503": _error("No live worker serves the model, or Redis unavailable"),
                    "504": _error("No answer within RAGQ_CHAT_TIMEOUT_S (the job is cancelled)"),
                },
            }
        },
        "/v1/batches/{batch_id}/retry": {
            "post": {
                "summary": "A new batch of this ended batch's failed and expired items, linked to it",
                "parameters": [
                    batch_id,
                    {"name": "error_type", "in": "query", "required": False, "schema": {"type": "array", "items": {"type": "string"}},
                     "style": "form", "explode": True},
                    {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255}},
                ],
                "responses": {
                    "200": _batch("The retry an earlier request with this Idempotency-Key created"),
                    "202": _batch("The retry batch"),
                    "404": _error("No such batch"),
                    "409": _error("The batch has not ended, or nothing to retry"),
                    "422": _error("Unknown query parameter"),
                },
            }
        },
    }
