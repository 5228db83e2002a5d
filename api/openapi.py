"""`GET /openapi.json`: an OpenAPI 3.1 document built from the same pydantic models that validate requests."""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from pydantic.json_schema import models_json_schema

from api import state
from shared.config import MAX_WAIT_S
from shared.batches import BatchListView
from shared.jobs import JobStatus, JobView

bp = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}, "details": {}},
        }
    },
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}}


def _job(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": REF.format(model="JobView")}}}}


def _batch(description: str, model: str = "BatchView") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": REF.format(model=model)}}}}


def _with_common_responses(paths: dict[str, Any]) -> dict[str, Any]:
    """Every /v1 operation may answer 401 (keys configured), 429 (quotas) and 503 (Redis down or full)."""
    for path, operations in paths.items():
        if not path.startswith("/v1/"):
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}]
            operation["responses"].setdefault("401", _error("No API key, or an unknown one (when keys are configured)"))
            operation["responses"].setdefault("429", _error("Outstanding-jobs quota or request rate used up; see Retry-After"))
            operation["responses"].setdefault("503", _error("Redis unavailable or full; see Retry-After"))
            # From gunicorn, before the app: a query string over its request-line limit.
            operation["responses"].setdefault("414", {"description": "Request line (URL) too long"})
    return paths


def build_document() -> dict[str, Any]:
    """The OpenAPI document for this app's settings (bounds and served models included)."""
    requests = state.get().requests
    job_request = requests.job
    _, schemas = models_json_schema(
        [
            (job_request, "validation"),
            (requests.batch_line, "validation"),
            (requests.batch_options, "validation"),
            (JobView, "serialization"),
            (BatchListView, "serialization"),
        ],
        ref_template=REF,
    )
    components = schemas.get("$defs", {})
    components["Error"] = ERROR_SCHEMA
    # The JSON form: the batch options (which allow no other field) plus `requests`. Not `allOf`, which
    # cannot add a property to a closed object.
    options = components[requests.batch_options.__name__]
    lines = {"type": "array", "minItems": 1, "items": {"$ref": REF.format(model=requests.batch_line.__name__)}}
    components["BatchJson"] = {
        **options,
        "title": "BatchJson",
        "properties": {**options.get("properties", {}), "requests": lines},
        "required": [*options.get("required", []), "requests"],
    }
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
    batch_id = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
    not_found = _error("No such job")
    return {
        "openapi": "3.1.0",
        "info": {"title": "ragq", "version": "1", "description": "Retrieval-augmented question answering jobs."},
        "paths": _with_common_responses({
            "/v1/jobs": {
                "post": {
                    "summary": "Submit a question",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": REF.format(model=job_request.__name__)}}},
                    },
                    "responses": {
                        "202": _job("Job accepted and queued"),
                        "400": _error("Body is not JSON"),
                        "413": _error("Body too large"),
                        "422": _error("Validation failed"),
                        "503": _error("Redis unavailable"),
                    },
                }
            },
            "/v1/jobs/{job_id}": {
                "get": {
                    "summary": "Read a job, optionally waiting for it to finish",
                    "parameters": [
                        job_id,
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S},
                        },
                    ],
                    "responses": {
                        "200": _job("The job"),
                        "404": not_found,
                        "422": _error("Bad wait"),
                        "503": _error("Redis unavailable"),
                    },
                },
                "delete": {
                    "summary": "Cancel a queued or running job",
                    "parameters": [job_id],
                    "responses": {
                        "200": _job("The cancelled job"),
                        "404": not_found,
                        "409": _error("Job already finished"),
                        "503": _error("Redis unavailable"),
                    },
                },
            },
            "/v1/batches": {
                "post": {
                    "summary": "Submit a batch: JSONL or CSV body with options as query parameters, or JSON",
                    "parameters": [
                        {"name": name, "in": "query", "required": False, "schema": options["properties"][name]}
                        for name in ("model", "completion_window", "callback_url", "retrieval")
                    ]
                    # Objects in a query string: JSON text.
                    + [
                        {"name": name, "in": "query", "required": False, "content": {"application/json": {"schema": options["properties"][name]}}}
                        for name in ("metadata", "params", "evaluate")
                    ]
                    + [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255}}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/x-ndjson": {"schema": {"$ref": REF.format(model=requests.batch_line.__name__)}},
                            "text/csv": {"schema": {"type": "string"}},
                            "application/json": {"schema": {"$ref": REF.format(model="BatchJson")}},
                        },
                    },
                    "responses": {
                        "200": _batch("The batch an earlier request with this Idempotency-Key created"),
                        "202": _batch("Batch accepted"),
                        "409": _error("Idempotency-Key reused for another request"),
                        "413": _error("Too many lines or bytes"),
                        "422": _error("Invalid lines (details name each) or options"),
                        "503": _error("Redis unavailable"),
                    },
                },
                "get": {
                    "summary": "List batches, newest first",
                    "parameters": [
                        {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                        {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _batch("A page of batches", "BatchListView"),
                        "404": _error("No such batch as `after`"),
                        "422": _error("Bad limit"),
                    },
                },
            },
            "/v1/batches/{batch_id}": {
                "get": {"summary": "Read a batch", "parameters": [batch_id], "responses": {"200": _batch("The batch"), "404": _error("No such batch")}}
            },
            "/v1/batches/{batch_id}/cancel": {
                "post": {
                    "summary": "Cancel a batch",
                    "parameters": [batch_id],
                    "responses": {"200": _batch("The batch"), "404": _error("No such batch"), "409": _error("Batch has ended")},
                }
            },
            "/v1/batches/{batch_id}/results": {
                "get": {
                    "summary": "Results as JSONL in input order",
                    "parameters": [
                        batch_id,
                        {"name": "status", "in": "query", "required": False, "schema": {"enum": [s.value for s in JobStatus]}},
                    ],
                    "responses": {
                        "200": {"description": "JSONL", "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                        "404": _error("No such batch"),
                        "422": _error("Bad status"),
                    },
                }
            },
            "/v1/callbacks/secret": {
                "get": {
                    "summary": "The tenant's secret for verifying batch callbacks (Ragq-Signature)",
                    "responses": {"200": {"description": "secret, header, scheme, tolerance_s"}, "404": _error("Callbacks not configured")},
                }
            },
            "/healthz": {"get": {"summary": "Process is up", "responses": {"200": {"description": "ok"}}}},
            "/readyz": {
                "get": {
                    "summary": "Redis is reachable",
                    "responses": {"200": {"description": "ready"}, "503": _error("Redis unavailable")},
                }
            },
        }),
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "Needed once API keys are configured."}},
        },
    }


@bp.get("/openapi.json")
def openapi() -> dict[str, Any]:
    """The OpenAPI document."""
    return build_document()
