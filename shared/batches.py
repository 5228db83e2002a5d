"""Batches: the record, its statuses, and reading a submitted file (JSONL, CSV or JSON) into validated item rows.

JSONL and CSV are read as streams, line by line. Every line is validated before the batch is committed; a bad
file is refused whole with each bad line named.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Literal

import pydantic
from pydantic import BaseModel, Field

from shared import openai_shapes
from shared.api_keys import LOCAL_TENANT
from shared.errors import PayloadTooLarge, ValidationFailed
from shared.jobs import RequestModels, check_token_range, iso

MAX_REPORTED_ERRORS = 100
WINDOW_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 30 * 86400


class BatchStatus(enum.StrEnum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    FAILED = "failed"

    @property
    def has_ended(self) -> bool:
        return self in ENDED


ENDED = frozenset({BatchStatus.COMPLETED, BatchStatus.CANCELLED, BatchStatus.EXPIRED, BatchStatus.FAILED})
COUNT_NAMES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")


def window_seconds(window: str) -> int:
    """`24h` -> 86400."""
    seconds = int(window[:-1]) * WINDOW_UNITS_S[window[-1]]
    if seconds > MAX_WINDOW_S:
        raise ValidationFailed("completion_window is longer than 30 days", details=[{"field": "completion_window"}])
    return seconds


def new_batch_id() -> str:
    """A fresh batch id (made before the upload is read, so an Idempotency-Key can be claimed for it)."""
    return f"batch_{uuid.uuid4().hex}"


@dataclass
class Batch:
    """One batch's record, as stored in Redis (its counts live beside it)."""

    id: str
    status: BatchStatus
    model: str
    total: int
    created_at: float
    expires_at: float
    completion_window: str
    metadata: dict[str, str] | None = None
    callback_url: str | None = None
    in_progress_at: float | None = None
    completed_at: float | None = None
    cancelled_at: float | None = None
    expired_at: float | None = None
    tenant: str = LOCAL_TENANT
    # Batches made from an uploaded file (OpenAI's form) are shown in OpenAI's shape (`shared.openai_shapes`).
    input_file_id: str | None = None
    endpoint: str | None = None
    # Retries (`POST /v1/batches/<id>/retry`): the batch this one retries, and the retries of this one.
    retry_of: str | None = None
    retried_by: list[str] | None = None

    # Evaluation (docs/design.md "Retrieval modes"): on for the batch, and its figures once it has ended.
    evaluate: bool = False
    evaluation: dict[str, Any] | None = None

    @classmethod
    def new(
        cls,
        model: str,
        total: int,
        completion_window: str,
        metadata: dict[str, str] | None,
        callback_url: str | None,
        tenant: str = LOCAL_TENANT,
        batch_id: str | None = None,
        evaluate: bool = False,
    ) -> Batch:
        now = time.time()
        return cls(
            id=batch_id or new_batch_id(),
            status=BatchStatus.IN_PROGRESS,
            model=model,
            total=total,
            created_at=now,
            in_progress_at=now,
            expires_at=now + window_seconds(completion_window),
            completion_window=completion_window,
            metadata=metadata,
            callback_url=callback_url,
            tenant=tenant,
            evaluate=evaluate,
        )

    def to_redis(self) -> dict[str, str]:
        fields = {k: json.dumps(v) for k, v in asdict(self).items() if k != "status"}
        fields["status"] = self.status.value
        return fields

    @classmethod
    def from_redis(cls, fields: dict[str, str]) -> Batch:
        known = set(cls.__dataclass_fields__)
        values = {k: json.loads(v) for k, v in fields.items() if k in known and k != "status"}
        return cls(status=BatchStatus(fields["status"]), **values)

    def to_public(self, counts: dict[str, int]) -> dict[str, Any]:
        """The batch as the API returns it; `request_counts` always add up to `total`."""
        if self.input_file_id is not None:
            return self._to_openai(counts)
        data = asdict(self)
        total = data.pop("total")
        for name in ("tenant", "input_file_id", "endpoint"):
            del data[name]
        data["retried_by"] = data["retried_by"] or []
        for name in ("created_at", "expires_at", "in_progress_at", "completed_at", "cancelled_at", "expired_at"):
            data[name] = iso(data[name])
        data["status"] = self.status.value
        data["request_counts"] = {"total": total, **{name: counts.get(name, 0) for name in COUNT_NAMES}}
        return BatchView.model_validate({"object": "batch", **data}).model_dump(mode="json")

    def _to_openai(self, counts: dict[str, int]) -> dict[str, Any]:
        """OpenAI's batch object, with ragq's own fields and counts added (nothing of either is lost)."""
        ended = self.status.has_ended
        succeeded, failed = counts.get("succeeded", 0), counts.get("failed", 0)
        errors = failed + counts.get("cancelled", 0) + counts.get("expired", 0)
        data = {
            "object": "batch",
            "id": self.id,
            "endpoint": self.endpoint,
            "errors": None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status.value,
            "output_file_id": openai_shapes.output_file_id(self.id) if ended and succeeded else None,
            "error_file_id": openai_shapes.error_file_id(self.id) if ended and errors else None,
            "created_at": int(self.created_at),
            "in_progress_at": openai_shapes.timestamp(self.in_progress_at),
            "expires_at": int(self.expires_at),
            "finalizing_at": None,
            "completed_at": openai_shapes.timestamp(self.completed_at),
            "failed_at": None,
            "expired_at": openai_shapes.timestamp(self.expired_at),
            "cancelling_at": None,
            "cancelled_at": openai_shapes.timestamp(self.cancelled_at),
            "request_counts": {
                "total": self.total, "completed": succeeded, **{name: counts.get(name, 0) for name in COUNT_NAMES}
            },
            "metadata": self.metadata,
            "model": self.model,
            "retry_of": self.retry_of,
            "retried_by": self.retried_by or [],
        }
        return OpenAIBatchView.model_validate(data).model_dump(mode="json")


class EvaluationView(BaseModel):
    """An evaluated batch's figures over its succeeded items (see `shared.evaluation`)."""

    retrieval_n: int = Field(description="Succeeded items with an `expected_document`.")
    hit_rate: float | None
    mrr: float | None
    answer_n: int = Field(description="Succeeded items with a `reference_answer` whose answer was scored.")
    answer_similarity: float | None = Field(description="Mean cosine similarity of the answers to their references.")


class RequestCountsView(BaseModel):
    """How many items are in each state; they always add up to `total`."""

    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    expired: int


class BatchView(BaseModel):
    """A batch as `GET /v1/batches/<id>` returns it."""

    object: Literal["batch"]
    id: str
    status: BatchStatus
    model: str
    created_at: str
    in_progress_at: str | None
    completed_at: str | None
    cancelled_at: str | None
    expired_at: str | None
    expires_at: str
    completion_window: str
    metadata: dict[str, str] | None
    callback_url: str | None
    request_counts: RequestCountsView
    retry_of: str | None = Field(None, description="The batch this one retries (`POST /v1/batches/<id>/retry`).")
    retried_by: list[str] = Field(default_factory=list, description="Batches retrying this one's failed or expired items.")
    evaluate: bool = Field(False, description="Whether the batch was created with `evaluate`.")
    evaluation: EvaluationView | None = Field(None, description="An evaluated batch's figures, once it has ended.")


class OpenAIRequestCountsView(RequestCountsView):
    completed: int = Field(description="OpenAI's name for `succeeded`.")


class OpenAIBatchView(BaseModel):
    """A batch created from an uploaded file (`input_file_id`): OpenAI's batch object plus ragq's fields."""

    object: Literal["batch"]
    id: str
    endpoint: str | None
    errors: None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: None
    completed_at: int | None
    failed_at: None
    expired_at: int | None
    cancelling_at: None
    cancelled_at: int | None
    request_counts: OpenAIRequestCountsView
    metadata: dict[str, str] | None
    model: str
    retry_of: str | None
    retried_by: list[str]
    evaluate: bool = Field(False, description="Whether the batch was created with `evaluate`.")
    evaluation: EvaluationView | None = Field(None, description="An evaluated batch's figures, once it has ended.")


class BatchListView(BaseModel):
    """A page of `GET /v1/batches`, newest first."""

    object: Literal["list"]
    data: list[BatchView | OpenAIBatchView]
    has_more: bool


JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines")


@dataclass
class Submission:
    """A submitted file opened as a stream: its batch options, validated, and its lines, read one at a time."""

    options: BaseModel
    raw_lines: Iterator[tuple[int, Any]]
    decoded: bool  # lines are already Python objects (JSON, CSV), not JSON text (JSONL)
    default_params: dict[str, Any] = field(default_factory=dict)


class _LineErrors:
    """Collects per-line errors; the first 100 are reported."""

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []
        self.count = 0

    def add(self, line: int, message: str) -> None:
        self.count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"line": line, "message": message})

    def raise_if_any(self) -> None:
        if self.count:
            raise ValidationFailed(
                f"{self.count} line(s) of the batch are invalid; nothing was created", details=self.errors
            )


def _summary(exc: pydantic.ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(line)'}: {err['msg']}"
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    )


def open_submission(stream: IO[bytes], content_type: str, query_options: dict[str, Any], models: RequestModels) -> Submission:
    """Read a submission's options and set up reading its lines from `stream` (binary), without reading them.

    JSONL and CSV are read line by line, so a large file is never whole in memory; a JSON document (its options
    live in the body) is read whole.
    """
    media = content_type.split(";")[0].strip().lower()
    if media == "application/json":
        return document_submission(read_json_document(stream), query_options, models)
    return _stream_submission(stream, media, content_type, query_options, models)


def read_json_document(stream: IO[bytes]) -> Any:
    """A JSON batch body, read whole (its size is bounded by `RAGQ_MAX_BATCH_BYTES`)."""
    try:
        return json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValidationFailed(f"body is not valid JSON: {exc}") from exc


def document_submission(document: Any, query_options: dict[str, Any], models: RequestModels) -> Submission:
    """The submission of a JSON batch body (`{"requests": [...], ...options}`)."""
    return _stream_submission(document, "application/json", "application/json", query_options, models)


def _stream_submission(
    stream: Any, media: str, content_type: str, query_options: dict[str, Any], models: RequestModels
) -> Submission:
    options_data = dict(query_options)
    raw_lines: Iterator[tuple[int, Any]]
    if media == "application/json":
        document = stream
        if not isinstance(document, dict) or not isinstance(document.get("requests"), list):
            raise ValidationFailed('a JSON batch is an object with a "requests" list')
        requests = document.pop("requests")
        options_data.update(document)
        raw_lines, decoded = ((i + 1, item) for i, item in enumerate(requests)), True
    elif media in JSONL_TYPES:
        raw_lines, decoded = _jsonl_lines(stream), False
    elif media == "text/csv":
        raw_lines, decoded = _csv_lines(stream), True
    else:
        raise ValidationFailed(
            "Content-Type must be application/x-ndjson (JSONL), text/csv or application/json",
            details={"content_type": content_type},
        )
    try:
        options = models.batch_options.model_validate(options_data)
    except pydantic.ValidationError as exc:
        raise ValidationFailed(f"batch options are invalid: {_summary(exc)}") from exc
    window_seconds(options.completion_window)  # type: ignore[attr-defined]
    defaults = getattr(options, "params", None)
    default_params = {} if defaults is None else defaults.model_dump(exclude_none=True)
    return Submission(options, raw_lines, decoded, default_params)


def item_rows(submission: Submission, models: RequestModels, max_lines: int) -> Iterator[list[Any]]:
    """Validate the submission's lines as they are read, yielding one compact item row per line for
    `BatchStore.stage`: [job id, question, course, top_k, params, custom_id, retrieval, expected_document,
    reference_answer].

    Job ids are made here; the batch's default params are merged under each line's own. Rows stop at the first
    bad line (every line is still checked); at the end, `ValidationFailed` names the bad lines, or
    `PayloadTooLarge` is raised as soon as there are more than `max_lines`. So the caller must discard what
    it stored of the rows unless this iterator ends normally.
    """
    errors = _LineErrors()
    first_seen: dict[str, int] = {}
    line_model = models.batch_line
    default_params = submission.default_params
    retrieval: str = getattr(submission.options, "retrieval", "text")
    evaluate: bool = getattr(submission.options, "evaluate", False)
    count = 0
    for number, raw in submission.raw_lines:
        count += 1
        if count > max_lines:
            raise PayloadTooLarge(f"a batch may hold at most {max_lines} lines; this one has more")
        try:
            line: Any = line_model.model_validate(raw) if submission.decoded else line_model.model_validate_json(raw)
        except pydantic.ValidationError as exc:
            errors.add(number, _summary(exc))
            continue
        custom_id: str = line.custom_id
        problem = _merged_params_problem(default_params, line)
        if not evaluate and (line.expected_document is not None or line.reference_answer is not None):
            problem = "expected_document and reference_answer need the batch option `evaluate: true`"
        if problem:
            errors.add(number, problem)
            continue
        if custom_id in first_seen:
            errors.add(number, f"duplicate custom_id {custom_id!r} (first on line {first_seen[custom_id]})")
            continue
        first_seen[custom_id] = number
        if errors.count:
            continue
        # Read the validated fields directly: model_dump per line is a large share of accepting 100,000.
        params = line.params.model_dump(exclude_none=True) if line.params.model_fields_set else {}
        yield [
            str(uuid.uuid4()), line.question, line.course, line.top_k, {**default_params, **params}, custom_id,
            line.retrieval or retrieval, line.expected_document, line.reference_answer,
        ]
    errors.raise_if_any()
    if not count:
        raise ValidationFailed("the batch has no lines")


def _merged_params_problem(default_params: dict[str, Any], line: Any) -> str | None:
    """Why a line's params merged over the batch's default params cannot run (each alone is valid), or None."""
    if not default_params:
        return None
    own = line.params
    merged = {**default_params, **{k: v for k, v in own if v is not None}}
    try:
        check_token_range(merged.get("min_new_tokens"), merged.get("max_new_tokens"))
    except ValueError as exc:
        return f"params (with the batch's default params): {exc}"
    return None


def _jsonl_lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of a JSONL stream, numbered from 1 (blank lines count), as bytes."""
    for number, line in enumerate(stream, start=1):
        if number == 1:
            # A UTF-8 byte-order mark (as some editors write) is not part of the first line.
            line = line.removeprefix(b"\xef\xbb\xbf")
        if line.strip():
            yield number, line


def _csv_lines(stream: IO[bytes]) -> Iterator[tuple[int, Any]]:
    """CSV rows as dicts with `question`, `course` and `custom_id` (row number when absent); other columns ignored."""
    # newline="" lets the csv module see line ends itself, as its documentation asks. strict: an unterminated
    # quote is an error, not a field that swallows every line after it.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")  # type: ignore[arg-type]
    reader = csv.DictReader(text, strict=True)
    try:
        if reader.fieldnames is None or "question" not in reader.fieldnames:
            raise ValidationFailed("CSV needs a header row with a `question` column (and optionally course, custom_id)")
        for row_number, row in enumerate(reader, start=1):
            item: dict[str, Any] = {"question": row.get("question") or "", "custom_id": row.get("custom_id") or str(row_number)}
            if row.get("course"):
                item["course"] = row["course"]
            yield reader.line_num, item
    except UnicodeDecodeError as exc:
        raise ValidationFailed(f"CSV is not UTF-8: {exc}") from exc
    except csv.Error as exc:
        # line_num counts the lines of the records read so far: the broken one starts on the next line.
        line = reader.line_num + 1
        raise ValidationFailed(f"CSV is malformed in the record starting at line {line}: {exc}", details=[{"line": line}]) from exc
    finally:
        # The stream belongs to the caller.
        text.detach()
