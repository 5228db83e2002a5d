"""`GET /openapi.json`: an OpenAPI 3.1 document built from the same pydantic models that validate requests."""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from pydantic.json_schema import models_json_schema

from api import openapi_openai, state
from api.openai_compat import FileBatchRequest
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


# `/v1/models` (api/models.py, shared/overview.py): OpenAI's model object with ragq's fields added.
_INT = {"type": "integer"}
_NUMBER = {"type": "number"}
_STRING = {"type": "string"}
_ERROR_AT = {
    "type": ["object", "null"],
    "properties": {"type": _STRING, "message": _STRING, "at": {**_NUMBER, "description": "Unix seconds"}},
}
MODEL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by", "workers", "queues", "throughput", "batches", "recent_failures"],
    "properties": {
        "id": {**_STRING, "description": "The served model's name (what jobs and batches ask for)."},
        "object": {"const": "model"},
        "created": {**_INT, "description": "Unix seconds: when its oldest live worker came up (else when the API started)."},
        "owned_by": {"const": "ragq"},
        "workers": {
            "type": "array",
            "description": "Live workers of this model (they leave at shutdown, or RAGQ_WORKER_TTL_S after dying).",
            "items": {
                "type": "object",
                "properties": {
                    "name": _STRING, "host": _STRING, "pid": _INT, "device": _STRING, "dtype": _STRING,
                    "max_batch_size": {**_INT, "description": "Jobs per microbatch at most."},
                    "max_batch_tokens": {**_INT, "description": "Padded prompt tokens x beams per generate call at most."},
                    "engine": {"enum": ["starting", "ready", "restarting", "thread"]},
                    "engine_restarts": _INT,
                    "up_since": {**_NUMBER, "description": "Unix seconds."},
                    "jobs_done": _INT,
                    "items_per_s": {**_NUMBER, "description": "Jobs ended per second over the last minute."},
                    "last_error": _ERROR_AT,
                },
            },
        },
        "queues": {
            "type": "object",
            "properties": {
                "interactive_queued": {**_INT, "description": "Jobs waiting in the model's interactive queue."},
                "backlog_pending": {**_INT, "description": "Batch items not yet taken by a worker."},
                "running": {**_INT, "description": "Jobs taken by the model's live workers (running or reserved)."},
            },
        },
        "throughput": {
            "type": "array",
            "description": "Items ended per 10 s bucket over the last 15 minutes, oldest first.",
            "items": {"type": "object", "properties": {"t": {**_INT, "description": "Bucket start, Unix seconds."}, "items": _INT, "failed": _INT}},
        },
        "batches": {
            "type": "array",
            "description": "The caller's open batches for this model.",
            "items": {
                "type": "object",
                "properties": {
                    "id": _STRING, "status": _STRING, "total": _INT, "completed": _INT, "failed": _INT,
                    "progress": {**_NUMBER, "minimum": 0, "maximum": 1},
                    "items_per_s": {**_NUMBER, "description": "The batch's drain rate over the last minute."},
                    "eta_s": {"type": ["number", "null"], "description": "Seconds left at that rate; null while it is 0."},
                    "created_at": _INT,
                },
            },
        },
        "recent_failures": {
            "type": "array",
            "description": "The caller's most recent failed jobs on this model, newest first (at most 20).",
            "items": {
                "type": "object",
                "properties": {"job_id": _STRING, "batch_id": {"type": ["string", "null"]}, "type": _STRING, "message": _STRING, "at": _NUMBER},
            },
        },
    },
}
MODEL_LIST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": REF.format(model="Model")}}},
}


def _models_paths() -> dict[str, Any]:
    """`/v1/models` and `/v1/models/{name}`."""
    name = {"name": "name", "in": "path", "required": True, "schema": _STRING}
    return {
        "/v1/models": {
            "get": {
                "summary": "Served models with their live workers, queues, throughput, and the caller's batches and failures",
                "responses": {"200": _batch("Every served model", "ModelList")},
            }
        },
        "/v1/models/{name}": {
            "get": {
                "summary": "One served model",
                "parameters": [name],
                "responses": {"200": _batch("The model", "Model"), "404": _error("No served model has this name (`model_not_found`)")},
            }
        },
    }


_USAGE_ROW: dict[str, Any] = {
    "type": "object",
    "required": ["tenant", "model", "jobs", "prompt_tokens", "completion_tokens", "generate_seconds"],
    "properties": {
        "tenant": {"type": "string"},
        "model": {"type": "string"},
        "start": {"type": "string", "format": "date-time"},
        "end": {"type": "string", "format": "date-time"},
        "jobs": {"type": "integer"},
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "generate_seconds": {"type": "number"},
    },
}
USAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["object", "granularity", "start", "end", "scope", "data", "totals"],
    "properties": {
        "object": {"const": "usage"},
        "granularity": {"enum": ["hour", "day"]},
        "start": {"type": "string", "format": "date-time"},
        "end": {"type": "string", "format": "date-time"},
        "scope": {"enum": ["tenant", "all"], "description": "all: an admin tenant's view of every tenant"},
        "data": {"type": "array", "items": _USAGE_ROW, "description": "Per hour or day, tenant and model, oldest first"},
        "totals": {"type": "array", "items": _USAGE_ROW, "description": "The range's sums per tenant and model"},
    },
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}}


def _job(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": REF.format(model="JobView")}}}}


def _batch(description: str, model: str = "BatchView") -> dict[str, Any]:
    if model == "BatchView":
        # Batches made from an uploaded file are shown in OpenAI's shape.
        return openapi_openai._batch(description)
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
            (FileBatchRequest, "validation"),
        ],
        ref_template=REF,
    )
    components = schemas.get("$defs", {})
    components["Error"] = ERROR_SCHEMA
    components["Model"] = MODEL_SCHEMA
    components["ModelList"] = MODEL_LIST_SCHEMA
    components.update(openapi_openai.schemas())
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
                            "application/json": {
                                "schema": {"anyOf": [{"$ref": REF.format(model="BatchJson")}, {"$ref": REF.format(model="FileBatchRequest")}]}
                            },
                        },
                    },
                    "responses": {
                        "200": _batch("The batch an earlier request with this Idempotency-Key created"),
                        "202": _batch("Batch accepted"),
                        "400": _error("An endpoint other than /v1/chat/completions (input_file_id form)"),
                        "404": _error("No such input file"),
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
                        {"name": "merged", "in": "query", "required": False, "schema": {"enum": ["true", "false"]}},
                    ],
                    "responses": {
                        "200": {"description": "JSONL", "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                        "404": _error("No such batch"),
                        "422": _error("Bad status or merged"),
                    },
                }
            },
            **_models_paths(),
            **openapi_openai.paths(),
            "/v1/callbacks/secret": {
                "get": {
                    "summary": "The tenant's secret for verifying batch callbacks (Ragq-Signature)",
                    "responses": {"200": {"description": "secret, header, scheme, tolerance_s"}, "404": _error("Callbacks not configured")},
                }
            },
            # Usage and metrics (api/usage.py, api/metrics.py).
            "/v1/usage": {
                "get": {
                    "summary": "Usage per tenant and model by hour or day; an admin tenant sees every tenant's",
                    "parameters": [
                        {"name": "granularity", "in": "query", "required": False, "schema": {"enum": ["hour", "day"], "default": "day"}},
                        *(
                            {"name": name, "in": "query", "required": False, "schema": {"type": "string"},
                             "description": "ISO 8601 time (no offset: UTC) or Unix seconds"}
                            for name in ("start", "end")
                        ),
                    ],
                    "responses": {
                        "200": {"description": "Usage", "content": {"application/json": {"schema": USAGE_SCHEMA}}},
                        "400": _error("Bad granularity, start or end, or a range longer than the retention"),
                        "422": _error("Unknown query parameter"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text format)",
                    "responses": {
                        "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                        "401": _error("RAGQ_METRICS_REQUIRE_KEY is on and no valid key was sent"),
                        "403": _error("RAGQ_METRICS_REQUIRE_KEY is on and the key is not an admin tenant's"),
                    },
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
