"""The job: its status state machine, the request that creates it, and the record clients read."""

from __future__ import annotations

import enum
import functools
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from shared.api_keys import LOCAL_TENANT
from shared.config import MAX_NUM_BEAMS, MAX_TOP_K, RETRIEVAL_MODES, Settings


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        return not TRANSITIONS[self]


# running -> running is a redelivery: the worker that held the job died and another takes it over (the
# transition script refuses it while the holder's heartbeat lives); only one can make the final transition.
# running -> queued: a stopping worker gives back batch items it claimed and never started (`worker.backlog`).
# expired: a batch item not finished when its batch's completion window ended.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.EXPIRED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
    JobStatus.EXPIRED: frozenset(),
}


def allowed_sources(target: JobStatus) -> list[JobStatus]:
    """Statuses from which a job may move to `target`."""
    return [status for status, targets in TRANSITIONS.items() if target in targets]


class GenerationParamsBase(BaseModel):
    """Generation knobs a job may set; unset ones take the model family's defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)


class JobRequestBase(BaseModel):
    """Body of `POST /v1/jobs`."""

    model_config = ConfigDict(extra="forbid", strict=True)


@dataclass(frozen=True)
class RequestModels:
    """The request models of one deployment: bounds and served models come from its settings."""

    job: type[JobRequestBase]
    batch_line: type[JobRequestBase]
    batch_options: type[BaseModel]


COMPLETION_WINDOW = r"^[1-9][0-9]{0,6}[smhd]$"
MAX_METADATA_KEYS = 16
# Generation bounds: below 0.01 a temperature scales logits past float range; above 5 sampling is noise.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 5.0
MAX_SAMPLING_TOP_K = 1000
MAX_REFERENCE_CHARS = 20_000


def check_token_range(min_new_tokens: int | None, max_new_tokens: int | None) -> None:
    """Raise ValueError when both are set and min_new_tokens exceeds max_new_tokens."""
    if min_new_tokens is not None and max_new_tokens is not None and min_new_tokens > max_new_tokens:
        raise ValueError(f"min_new_tokens ({min_new_tokens}) must not exceed max_new_tokens ({max_new_tokens})")


@functools.cache
def request_models(
    question_chars_cap: int, new_tokens_cap: int, model_names: tuple[str, ...], default_retrieval: str = "text"
) -> RequestModels:
    """The request models with this deployment's bounds, so validation and the OpenAPI document agree."""

    class GenerationParams(GenerationParamsBase):
        # Every value here must be one `generate` can run: a temperature of 1e-300 divides the logits into
        # infinities and makes generate raise (on CUDA it can poison the process), so each knob is bounded on
        # both sides and NaN and infinity are refused (`allow_inf_nan=False`).
        max_new_tokens: int | None = Field(None, ge=1, le=new_tokens_cap, description="Tokens to generate at most.")
        min_new_tokens: int | None = Field(
            None, ge=0, le=new_tokens_cap, description="Tokens to generate at least; not above max_new_tokens."
        )
        num_beams: int | None = Field(None, ge=1, le=MAX_NUM_BEAMS, description="Beam search width.")
        do_sample: bool | None = Field(None, description="Sample instead of greedy or beam search.")
        temperature: float | None = Field(
            None, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, allow_inf_nan=False,
            description=f"Sampling temperature, {MIN_TEMPERATURE} to {MAX_TEMPERATURE} (for greedy decoding leave do_sample off).",
        )
        top_p: float | None = Field(
            None, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling mass, above 0 and at most 1."
        )
        top_k: int | None = Field(None, ge=1, le=MAX_SAMPLING_TOP_K, description="Sample from the k likeliest tokens.")

        @model_validator(mode="after")
        def _min_within_max(self) -> Any:
            check_token_range(self.min_new_tokens, self.max_new_tokens)
            return self

    class QuestionFields(JobRequestBase):
        question: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=question_chars_cap)]
        course: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = Field(
            None, description="Only retrieve FAQ entries of this course."
        )
        top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="FAQ entries to retrieve.")
        params: GenerationParams = Field(default_factory=GenerationParams)

    served = Literal[model_names]  # type: ignore[valid-type]
    # Retrieval modes (docs/design.md "Retrieval modes"): a job's own, else its batch's, else RAGQ_RETRIEVAL.
    mode = Literal[RETRIEVAL_MODES]  # type: ignore[valid-type]
    mode_help = "`text` (minsearch), `vector` (sentence embeddings) or `hybrid` (both fused)"

    class JobRequest(QuestionFields):
        model: served | None = Field(None, description="A served model; the default model when omitted.")  # type: ignore[valid-type]
        retrieval: mode = Field(default_retrieval, description=f"How FAQ entries are found: {mode_help}.")  # type: ignore[valid-type]

    class BatchLine(QuestionFields):
        custom_id: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
            description="Your key for this request; unique within the batch."
        )
        retrieval: mode | None = Field(None, description=f"{mode_help}; the batch's `retrieval` when omitted.")  # type: ignore[valid-type]
        expected_document: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
            None, description="With `evaluate`: the id of the FAQ entry that answers this question (hit rate, MRR)."
        )
        reference_answer: Annotated[str, StringConstraints(min_length=1, max_length=MAX_REFERENCE_CHARS)] | None = Field(
            None, description="With `evaluate`: a reference answer (cosine similarity of the generated answer to it)."
        )

    class BatchOptions(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        model: served | None = Field(None, description="A served model; the default model when omitted.")  # type: ignore[valid-type]
        completion_window: Annotated[str, StringConstraints(pattern=COMPLETION_WINDOW)] = Field(
            "24h", description="Items not finished this long after submission expire: `90s`, `30m`, `24h`, `7d`."
        )
        metadata: dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]] | None = Field(
            None, max_length=MAX_METADATA_KEYS, description="Up to 16 string pairs, returned with the batch."
        )
        callback_url: Annotated[str, StringConstraints(pattern=r"^https?://", max_length=2048)] | None = Field(
            None, description="Receives the final batch object, signed, once the batch ends."
        )
        params: GenerationParams | None = Field(None, description="Default generation params for every line.")
        retrieval: mode = Field(default_retrieval, description=f"Retrieval of lines that name none: {mode_help}.")  # type: ignore[valid-type]
        evaluate: bool = Field(
            False, description="Score the items that carry `expected_document` or `reference_answer`; the ended batch's `evaluation` sums them up."
        )

    return RequestModels(JobRequest, BatchLine, BatchOptions)


def request_models_for(settings: Settings) -> RequestModels:
    """`request_models` for these settings."""
    return request_models(settings.max_question_chars, settings.max_new_tokens, tuple(settings.model_names), settings.retrieval)


def iso(ts: float | None) -> str | None:
    """Epoch seconds as an ISO 8601 UTC string."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Job:
    """One question's record, as stored in Redis and shown to clients."""

    id: str
    status: JobStatus
    question: str
    model: str
    course: str | None = None
    top_k: int = 5
    params: dict[str, Any] = field(default_factory=dict)
    answer: str | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, str] | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    served_by: str | None = None
    worker: str | None = None
    attempts: int = 0
    batch_id: str | None = None
    custom_id: str | None = None
    tenant: str = LOCAL_TENANT
    retrieval: str = "text"
    # Batch items of an evaluated batch: what the answer is scored against, and the scores (`shared.evaluation`).
    expected_document: str | None = None
    reference_answer: str | None = None
    evaluation: dict[str, Any] | None = None

    @classmethod
    def new(cls, request: JobRequestBase, default_model: str, **extra: Any) -> Job:
        """A queued job for a validated request."""
        data = request.model_dump()
        return cls(
            id=str(uuid.uuid4()),
            status=JobStatus.QUEUED,
            question=data["question"],
            course=data["course"],
            model=data.get("model") or default_model,
            top_k=data["top_k"],
            params={k: v for k, v in data["params"].items() if v is not None},
            retrieval=data.get("retrieval") or "text",
            created_at=time.time(),
            **extra,
        )

    def to_redis(self) -> dict[str, str]:
        """Hash fields: status as-is (the transition script compares it), everything else JSON.

        Fields still at their defaults are left out: a backlog of 100,000 queued items stays small.
        """
        fields = {"status": self.status.value}
        # Shallow, unlike dataclasses.asdict: this runs once per line of a 100,000-line batch.
        for name, default in _DEFAULTS.items():
            value = getattr(self, name)
            if name != "status" and (name in _REQUIRED or value != default):
                fields[name] = json.dumps(value)
        return fields

    @classmethod
    def from_redis(cls, fields: dict[str, str]) -> Job:
        values: dict[str, Any] = {k: json.loads(v) for k, v in fields.items() if k != "status"}
        known = {f for f in cls.__dataclass_fields__}
        return cls(status=JobStatus(fields["status"]), **{k: v for k, v in values.items() if k in known})

    def to_public(self) -> dict[str, Any]:
        """The job as the API returns it, checked against the documented `JobView` schema."""
        data = asdict(self)
        for name in ("created_at", "started_at", "finished_at"):
            data[name] = iso(data[name])
        return JobView.model_validate(data).model_dump(mode="json")


_REQUIRED = {"id", "question", "model", "created_at"}
_DEFAULTS: dict[str, Any] = {
    f.name: (f.default_factory() if callable(f.default_factory) else f.default)  # type: ignore[misc]
    for f in Job.__dataclass_fields__.values()
}


def omitted_defaults(names: Sequence[str]) -> dict[str, str]:
    """For the fields among `names` that `Job.to_redis` leaves out while at their default: the default as JSON."""
    return {name: json.dumps(_DEFAULTS[name]) for name in names if name not in _REQUIRED}


class SourceView(BaseModel):
    """A retrieved FAQ entry, in rank order."""

    id: str
    course: str
    section: str
    question: str
    in_prompt: bool = Field(description="False when the entry was dropped to fit the model's input length.")


class JobErrorView(BaseModel):
    type: str
    message: str


class TimingsView(BaseModel):
    queue_ms: float | None = Field(None, description="From submission to a worker taking the job.")
    microbatch_wait_ms: float | None = Field(None, description="Time the job waited in the worker for its microbatch to start.")
    retrieval_ms: float | None = None
    generation_ms: float | None = Field(None, description="The generate call that answered the job.")
    total_ms: float | None = None
    microbatch_size: int | None = Field(None, description="Jobs in the microbatch (one pipeline pass) this job ran in.")


class UsageView(BaseModel):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class JobView(BaseModel):
    """A job as `GET /v1/jobs/<id>` returns it."""

    id: str
    status: JobStatus
    question: str
    course: str | None
    model: str
    top_k: int
    params: dict[str, Any]
    answer: str | None
    sources: list[SourceView]
    error: JobErrorView | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    timings: TimingsView
    usage: UsageView
    served_by: str | None = Field(description="The model that answered; names a stand-in when one was used.")
    worker: str | None
    attempts: int
    batch_id: str | None = Field(None, description="The batch this job is an item of, if any.")
    custom_id: str | None = Field(None, description="The item's custom_id in its batch.")
    retrieval: str = Field("text", description="How its FAQ entries were found: `text`, `vector` or `hybrid`.")
    evaluation: dict[str, Any] | None = Field(
        None, description="An evaluated batch's item: `hit`, `reciprocal_rank`, `answer_similarity` (each null when not scored)."
    )
