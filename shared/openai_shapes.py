"""OpenAI's shapes, mapped onto ragq's: chat-completion requests in, `chat.completion` objects and batch
output/error lines out, and the batch object of a batch created from an uploaded file.

A chat request becomes an ordinary ragq question: the last user message is the question, the RAG flow runs as
always. Only parameters ragq can honour are accepted; anything else is refused by name (never dropped silently).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import pydantic

from shared.jobs import Job, JobStatus, RequestModels

CHAT_ENDPOINT = "/v1/chat/completions"
ENDPOINTS = (CHAT_ENDPOINT,)
# Error types of lines refused before they ran: retrying them would fail the same way.
REJECTED_TYPES = frozenset({"unsupported_parameter", "invalid_request"})
# Body fields ragq maps (course and top_k are ragq's own extensions).
SUPPORTED = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream", "course", "top_k"}
)
OUTPUT_PREFIX = "file-out-"
ERROR_PREFIX = "file-err-"
MAX_MESSAGES = 256


class ChatRefused(Exception):
    """A chat-completion request ragq cannot run as asked; `type` is one of REJECTED_TYPES."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message


@dataclass(frozen=True)
class Rejected:
    """A batch line refused before it ran: stored as a failed item so it shows in the error file."""

    job_id: str
    custom_id: str
    error: dict[str, str]


def chat_to_job_fields(body: Any, models: RequestModels, default_course: str | None = None) -> Any:
    """A chat-completion body as a validated ragq job request (the `models.job` model); `ChatRefused` otherwise."""
    if not isinstance(body, dict):
        raise ChatRefused("invalid_request", "the body must be a JSON object")
    unknown = sorted(set(body) - SUPPORTED)
    if unknown:
        raise ChatRefused("unsupported_parameter", f"ragq does not support {', '.join(unknown)}")
    if body.get("stream") not in (None, False):
        raise ChatRefused("unsupported_parameter", "stream is not supported: ragq answers whole (poll or use a batch)")
    if body.get("n") not in (None, 1):
        raise ChatRefused("unsupported_parameter", "n must be 1: ragq generates one choice")
    if not isinstance(body.get("model"), str):
        raise ChatRefused("invalid_request", "model is required (a served model, see GET /v1/models)")
    fields: dict[str, Any] = {"question": _question(body.get("messages")), "model": body["model"]}
    course = body.get("course", default_course)
    if course is not None:
        fields["course"] = course
    if "top_k" in body:
        fields["top_k"] = body["top_k"]
    params: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        params["max_new_tokens"] = max_tokens
    temperature = body.get("temperature")
    if temperature is not None:
        if temperature == 0:
            params["do_sample"] = False  # OpenAI's temperature 0 is greedy decoding
        else:
            params["do_sample"] = True
            params["temperature"] = temperature
    top_p = body.get("top_p")
    if top_p is not None and top_p != 1:
        params["top_p"] = top_p
        params.setdefault("do_sample", True)
    if params:
        fields["params"] = params
    try:
        return models.job.model_validate(fields)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{_openai_name('.'.join(str(p) for p in err['loc']))}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False, include_context=False)
        )
        raise ChatRefused("invalid_request", problems) from exc


_NAMES = {"params.max_new_tokens": "max_tokens", "params.temperature": "temperature", "params.top_p": "top_p", "question": "messages"}


def _openai_name(ragq_name: str) -> str:
    return _NAMES.get(ragq_name, ragq_name)


def _question(messages: Any) -> str:
    """The text of the last user message."""
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise ChatRefused("invalid_request", f"messages must be a list of 1 to {MAX_MESSAGES} messages")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                        raise ChatRefused("unsupported_parameter", "only text content parts are supported")
                    parts.append(part["text"])
                return "\n".join(parts)
            raise ChatRefused("invalid_request", "a user message's content must be a string or a list of text parts")
    raise ChatRefused("invalid_request", "messages has no user message: its last one is the question")


class LineShape(pydantic.BaseModel):
    """One line of an OpenAI batch input file (its body is checked apart, to refuse lines one by one)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    custom_id: str = pydantic.Field(min_length=1, max_length=64)
    method: str
    url: str
    body: dict[str, Any]


def line_to_row(line: LineShape, models: RequestModels, batch_model: str, default_course: str | None) -> list[Any] | Rejected:
    """A parsed input line as an item row for `BatchStore.stage`, or `Rejected` with the reason."""
    job_id = str(uuid.uuid4())
    try:
        if line.method.upper() != "POST":
            raise ChatRefused("invalid_request", f"method must be POST, not {line.method}")
        if line.url != CHAT_ENDPOINT:
            raise ChatRefused("unsupported_parameter", f"url {line.url!r} is not supported; this batch's endpoint is {CHAT_ENDPOINT}")
        request = chat_to_job_fields(line.body, models, default_course)
        if request.model != batch_model:
            raise ChatRefused("invalid_request", f"model {request.model!r} differs from the batch's ({batch_model!r}); one model per batch")
    except ChatRefused as refused:
        return Rejected(job_id, line.custom_id, {"type": refused.type, "message": refused.message})
    params = {k: v for k, v in request.params.model_dump().items() if v is not None}
    return [job_id, request.question, request.course, request.top_k, params, line.custom_id]


def parse_line(raw: str) -> LineShape:
    """The line's shape (custom_id, method, url, body); `pydantic.ValidationError` or `ValueError` otherwise."""
    return LineShape.model_validate(json.loads(raw))


def chat_completion(job: Job) -> dict[str, Any]:
    """A succeeded job as OpenAI's `chat.completion` object, ragq's sources under `ragq`."""
    prompt = int(job.usage.get("prompt_tokens") or 0)
    completion = int(job.usage.get("completion_tokens") or 0)
    limit = job.params.get("max_new_tokens")
    return {
        "id": f"chatcmpl-{job.id.replace('-', '')}",
        "object": "chat.completion",
        "created": int(job.finished_at or job.created_at),
        "model": job.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": job.answer, "refusal": None},
                "logprobs": None,
                "finish_reason": "length" if limit is not None and completion >= limit else "stop",
            }
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        "system_fingerprint": None,
        "ragq": {"job_id": job.id, "sources": job.sources, "served_by": job.served_by},
    }


def output_line(job: Job) -> dict[str, Any]:
    """A succeeded item as a line of the batch's output file."""
    return {
        "id": f"batch_req_{job.id.replace('-', '')}",
        "custom_id": job.custom_id,
        "response": {"status_code": 200, "request_id": job.id, "body": chat_completion(job)},
        "error": None,
    }


def error_line(job: Job) -> dict[str, Any]:
    """A failed, expired or cancelled item as a line of the batch's error file."""
    response = None
    if job.status is JobStatus.FAILED:
        error = job.error or {"type": "error", "message": "failed"}
        code = error.get("type", "error")
        status_code = 400 if code in REJECTED_TYPES else 500
        response = {
            "status_code": status_code,
            "request_id": job.id,
            "body": {"error": {"message": error.get("message", ""), "type": code, "param": None, "code": code}},
        }
        summary = {"code": code, "message": error.get("message", "")}
    elif job.status is JobStatus.EXPIRED:
        summary = {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}
    else:
        summary = {"code": "batch_cancelled", "message": "This request was cancelled with its batch before it ran."}
    return {"id": f"batch_req_{job.id.replace('-', '')}", "custom_id": job.custom_id, "response": response, "error": summary}


def output_file_id(batch_id: str) -> str:
    return OUTPUT_PREFIX + batch_id.removeprefix("batch_")


def error_file_id(batch_id: str) -> str:
    return ERROR_PREFIX + batch_id.removeprefix("batch_")


def batch_of_file(file_id: str) -> tuple[str, str] | None:
    """(batch id, "output" or "error") for a batch's output or error file id; None for an uploaded file's."""
    for prefix, kind in ((OUTPUT_PREFIX, "output"), (ERROR_PREFIX, "error")):
        if file_id.startswith(prefix):
            return "batch_" + file_id.removeprefix(prefix), kind
    return None


def timestamp(value: float | None) -> int | None:
    return None if value is None else int(value)
