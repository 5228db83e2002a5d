"""Batches: the record, its statuses, and parsing a submitted file (JSONL, CSV or JSON) into validated lines.

Every line is validated before anything is stored; a bad file is refused whole with each bad line named.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import pydantic
from pydantic import BaseModel

from shared.errors import PayloadTooLarge, ValidationFailed
from shared.api_keys import LOCAL_TENANT
from shared.jobs import JobRequestBase, RequestModels, check_token_range, iso

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
        data = asdict(self)
        total = data.pop("total")
        del data["tenant"]
        for name in ("created_at", "expires_at", "in_progress_at", "completed_at", "cancelled_at", "expired_at"):
            data[name] = iso(data[name])
        data["status"] = self.status.value
        data["request_counts"] = {"total": total, **{name: counts.get(name, 0) for name in COUNT_NAMES}}
        return BatchView.model_validate({"object": "batch", **data}).model_dump(mode="json")


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


class BatchListView(BaseModel):
    """A page of `GET /v1/batches`, newest first."""

    object: Literal["list"]
    data: list[BatchView]
    has_more: bool


@dataclass
class ParsedBatch:
    """A submitted file, validated: batch options and one job request per line."""

    options: BaseModel
    lines: list[tuple[str, JobRequestBase]] = field(default_factory=list)


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


def parse_batch(
    body: bytes, content_type: str, query_options: dict[str, Any], models: RequestModels, max_lines: int
) -> ParsedBatch:
    """Validate a whole submission; raises `ValidationFailed` naming bad lines, or `PayloadTooLarge`."""
    media = content_type.split(";")[0].strip().lower()
    options_data = dict(query_options)
    if media == "application/json":
        try:
            document = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValidationFailed(f"body is not valid JSON: {exc}") from exc
        if not isinstance(document, dict) or not isinstance(document.get("requests"), list):
            raise ValidationFailed('a JSON batch is an object with a "requests" list')
        requests = document.pop("requests")
        options_data.update(document)
        raw_lines: list[tuple[int, Any]] = [(i + 1, item) for i, item in enumerate(requests)]
        decoded = True
    elif media in ("application/x-ndjson", "application/jsonl", "application/json-lines"):
        raw_lines = [(i + 1, line) for i, line in enumerate(body.splitlines()) if line.strip()]
        decoded = False
    elif media == "text/csv":
        raw_lines = _csv_lines(body)
        decoded = True
    else:
        raise ValidationFailed(
            "Content-Type must be application/x-ndjson (JSONL), text/csv or application/json",
            details={"content_type": content_type},
        )
    if len(raw_lines) > max_lines:
        raise PayloadTooLarge(f"a batch may hold at most {max_lines} lines; this one has {len(raw_lines)}")
    if not raw_lines:
        raise ValidationFailed("the batch has no lines")
    try:
        options = models.batch_options.model_validate(options_data)
    except pydantic.ValidationError as exc:
        raise ValidationFailed(f"batch options are invalid: {_summary(exc)}") from exc
    window_seconds(options.completion_window)  # type: ignore[attr-defined]

    parsed = ParsedBatch(options)
    defaults = getattr(options, "params", None)
    default_params = {} if defaults is None else defaults.model_dump(exclude_none=True)
    errors = _LineErrors()
    first_seen: dict[str, int] = {}
    line_model = models.batch_line
    for number, raw in raw_lines:
        try:
            line = line_model.model_validate(raw) if decoded else line_model.model_validate_json(raw)
        except pydantic.ValidationError as exc:
            errors.add(number, _summary(exc))
            continue
        custom_id: str = line.custom_id  # type: ignore[attr-defined]
        problem = _merged_params_problem(default_params, line)
        if problem:
            errors.add(number, problem)
            continue
        if custom_id in first_seen:
            errors.add(number, f"duplicate custom_id {custom_id!r} (first on line {first_seen[custom_id]})")
            continue
        first_seen[custom_id] = number
        parsed.lines.append((custom_id, line))
    errors.raise_if_any()
    return parsed


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


def _csv_lines(body: bytes) -> list[tuple[int, Any]]:
    """CSV rows as dicts with `question`, `course` and `custom_id` (row number when absent); other columns ignored."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValidationFailed(f"CSV is not UTF-8: {exc}") from exc
    # newline="" lets the csv module see line ends itself, as its documentation asks. strict: an unterminated
    # quote is an error, not a field that swallows every line after it.
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    rows = []
    try:
        if reader.fieldnames is None or "question" not in reader.fieldnames:
            raise ValidationFailed("CSV needs a header row with a `question` column (and optionally course, custom_id)")
        for row_number, row in enumerate(reader, start=1):
            item: dict[str, Any] = {"question": row.get("question") or "", "custom_id": row.get("custom_id") or str(row_number)}
            if row.get("course"):
                item["course"] = row["course"]
            rows.append((reader.line_num, item))
    except csv.Error as exc:
        # line_num counts the lines of the records read so far: the broken one starts on the next line.
        line = reader.line_num + 1
        raise ValidationFailed(f"CSV is malformed in the record starting at line {line}: {exc}", details=[{"line": line}]) from exc
    return rows


def batch_items(parsed: ParsedBatch) -> list[list[Any]]:
    """One compact row per line for `BatchStore.create`: [job id, question, course, top_k, params, custom_id].

    Job ids are made here; the batch's default params are merged under each line's own.
    """
    defaults = getattr(parsed.options, "params", None)
    default_params = {} if defaults is None else defaults.model_dump(exclude_none=True)
    rows = []
    for custom_id, line in parsed.lines:
        # Read the validated fields directly: model_dump per line is a large share of accepting 100,000.
        fields: Any = line
        params = fields.params.model_dump(exclude_none=True) if fields.params.model_fields_set else {}
        rows.append([str(uuid.uuid4()), fields.question, fields.course, fields.top_k, {**default_params, **params}, custom_id])
    return rows
