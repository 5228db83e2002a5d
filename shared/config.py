"""One typed configuration object, built once from the environment at start-up and passed in."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.api_keys import parse_admin_tenants, parse_env_keys
from shared.devices import check_placement_settings
from shared.models import ModelSpec, parse_model_list, parse_model_spec
from shared.netguard import DEFAULT_PORTS as DEFAULT_CALLBACK_PORTS
from shared.netguard import parse_ports
from shared.redis_url import check_redis_url

ENV_PREFIX = "RAGQ_"
# A Sentinel master name as `sentinel monitor` accepts it, and nothing that could smuggle a second argument.
SENTINEL_MASTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

# Bounds that requests may never exceed, whatever the configuration says.
MAX_TOP_K = 20
MAX_NUM_BEAMS = 8
MAX_WAIT_S = 60
HARD_MAX_NEW_TOKENS = 4096
HARD_MAX_QUESTION_CHARS = 20_000
# Retrieval modes a job may ask for (`worker/retrieval.py`); `text` is the course's minsearch search.
RETRIEVAL_MODES = ("text", "vector", "hybrid")


def _setting(
    env: str, default: Any, help: str, *, lo: float | None = None, hi: float | None = None, secret: bool = False
) -> Any:
    # Secrets stay out of repr(), so a logged or printed Settings never shows them.
    return field(default=default, repr=not secret, metadata={"env": env, "help": help, "lo": lo, "hi": hi})


@dataclass(frozen=True)
class Settings:
    """Every setting of ragq. Build it with `Settings.from_env()`; tests build it directly."""

    redis_url: str | None = _setting(
        "REDIS_URL",
        None,
        "Redis for broker and job store: `redis://`, `rediss://`, `unix://`, or `sentinel://[:password@]host:26379,host:26379,.../db`. "
        "`ragq serve` starts an embedded one when unset.",
        secret=True,
    )
    # Redis Sentinel (README "Redis Sentinel"): used only when REDIS_URL is a sentinel:// URL.
    sentinel_master: str = _setting(
        "RAGQ_SENTINEL_MASTER", "mymaster", "Name of the primary the sentinels of a `sentinel://` REDIS_URL watch."
    )
    sentinel_password: str | None = _setting(
        "RAGQ_SENTINEL_PASSWORD", None, "Password of the sentinels themselves (the primary's is in REDIS_URL). Unset: none.", secret=True
    )
    redis_min_replicas_acked: int = _setting(
        "RAGQ_REDIS_MIN_REPLICAS_ACKED",
        0,
        "Replicas that must hold a submission (Redis `WAIT`) before it is answered 202; else 503. 1 with Sentinel, so a failover loses no accepted job.",
        lo=0,
        hi=16,
    )
    redis_replica_ack_timeout_ms: int = _setting(
        "RAGQ_REDIS_REPLICA_ACK_TIMEOUT_MS", 1000, "How long a submission waits for RAGQ_REDIS_MIN_REPLICAS_ACKED replicas.", lo=1, hi=60_000
    )
    default_model: ModelSpec = _setting(
        "RAGQ_MODEL", ModelSpec.parse("flan-t5-base"), "Default model: alias, Hugging Face id or local directory."
    )
    extra_models: tuple[ModelSpec, ...] = _setting(
        "RAGQ_MODELS", (), "Other served models, `alias=source,...`."
    )
    worker_model: str | None = _setting(
        "RAGQ_WORKER_MODEL", None, "Served model a worker started without `--model` serves. Unset: the default model."
    )
    documents: str | None = _setting(
        "RAGQ_DOCUMENTS", None, "FAQ corpus: JSON file path or http(s) URL. Unset: the built-in ragq FAQ."
    )
    device: str = _setting(
        "RAGQ_DEVICE",
        "auto",
        "`auto` (CUDA if present; one model spans several GPUs), `cpu`, `cuda`, `cuda:N`, `mps`, or GPUs `cuda:0,cuda:1`.",
    )
    dtype: str = _setting("RAGQ_DTYPE", "auto", "`auto` (bf16 on CUDA, fp32 on CPU), `float32`, `bfloat16`, `float16`.")
    engine: str = _setting(
        "RAGQ_ENGINE", "process", "Where a worker runs its model: `process` (an engine process of its own) or `thread` (in the worker)."
    )
    continuous_batching: str = _setting(
        "RAGQ_CONTINUOUS_BATCHING",
        "auto",
        "`auto`: decoder-only models (Phi-3) answer greedy jobs by continuous batching where transformers supports it; `off`: static microbatches.",
    )
    max_memory: str | None = _setting(
        "RAGQ_MAX_MEMORY",
        None,
        "Weight budget per device, `cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB`: what does not fit goes to the next device, "
        "then the CPU, then disk. Unset: accelerate measures free memory.",
    )
    data_dir: Path = _setting("RAGQ_DATA_DIR", Path(".ragq"), "Embedded Redis data, corpus cache, fallback model.")
    prompt_template: str | None = _setting(
        "RAGQ_PROMPT_TEMPLATE_FILE", None, "File with a prompt template using `{question}` and `{context}`."
    )
    host: str = _setting("RAGQ_HOST", "127.0.0.1", "Address the API listens on.")
    port: int = _setting("RAGQ_PORT", 8000, "Port the API listens on.", lo=1, hi=65535)
    api_threads: int = _setting(
        "RAGQ_API_THREADS", 64, "Redis commands in flight per API process at most (its connection pool); long-polls wait without one.", lo=1, hi=1024
    )
    api_max_connections: int = _setting(
        "RAGQ_API_MAX_CONNECTIONS", 4000, "Open client connections per API process at most (gevent worker: each is a greenlet, not a thread).", lo=16, hi=100_000
    )
    header_timeout_s: int = _setting(
        "RAGQ_HEADER_TIMEOUT_S", 5, "Seconds a client has to send a request's headers (and between keep-alive requests); then it is cut off.", lo=1, hi=300
    )
    max_waits_per_tenant: int = _setting(
        "RAGQ_MAX_WAITS_PER_TENANT", 1000, "Concurrent `?wait=` long-polls per tenant per API process at most; then 429.", lo=1, hi=1_000_000
    )
    trust_network: bool = _setting(
        "RAGQ_TRUST_NETWORK", False, "Without API keys, serve peers beyond loopback too (the network is trusted). Off: only loopback peers."
    )
    allowed_hosts: str | None = _setting(
        "RAGQ_ALLOWED_HOSTS", None, "Without API keys, `Host` names accepted besides localhost, 127.0.0.1 and [::1] (comma-separated; against DNS rebinding)."
    )
    result_ttl_s: int = _setting("RAGQ_RESULT_TTL_S", 7 * 24 * 3600, "Seconds a finished job is kept.", lo=60, hi=365 * 24 * 3600)
    task_time_limit_s: int = _setting("RAGQ_TASK_TIME_LIMIT_S", 600, "Hard limit on one job's run.", lo=10, hi=24 * 3600)
    visibility_timeout_s: int = _setting(
        "RAGQ_VISIBILITY_TIMEOUT_S", 3600, "Seconds before an unacknowledged message is redelivered.", lo=60, hi=7 * 24 * 3600
    )
    model_load_timeout_s: int = _setting(
        "RAGQ_MODEL_LOAD_TIMEOUT_S", 1800, "Seconds a worker process may spend loading its model.", lo=10, hi=24 * 3600
    )
    max_question_chars: int = _setting(
        "RAGQ_MAX_QUESTION_CHARS", 2000, "Longest accepted question.", lo=1, hi=HARD_MAX_QUESTION_CHARS
    )
    max_new_tokens: int = _setting(
        "RAGQ_MAX_NEW_TOKENS", 1024, "Cap on a job's `params.max_new_tokens`.", lo=1, hi=HARD_MAX_NEW_TOKENS
    )
    max_input_tokens: int | None = _setting(
        "RAGQ_MAX_INPUT_TOKENS", None, "Prompt length cap in tokens. Unset: the model's own limit.", lo=16, hi=1_000_000
    )
    max_body_bytes: int = _setting("RAGQ_MAX_BODY_BYTES", 64 * 1024, "Largest accepted request body.", lo=1024, hi=1 << 30)
    # The next three size a worker's microbatches (the jobs that share one pipeline pass), not the API's
    # batches; their variables keep the names they had before the two words were told apart.
    max_microbatch_size: int | None = _setting(
        "RAGQ_MAX_BATCH_SIZE", None, "Jobs per microbatch (one pipeline pass) at most. Unset: 16 on CPU, 64 on CUDA.", lo=1, hi=1024
    )
    microbatch_wait_ms: int | None = _setting(
        "RAGQ_BATCH_WAIT_MS",
        None,
        "How long a microbatch waits for more jobs after its first. Unset: 20 on CPU, 5 on CUDA.",
        lo=0,
        hi=10_000,
    )
    max_microbatch_tokens: int | None = _setting(
        "RAGQ_MAX_BATCH_TOKENS",
        None,
        "Padded prompt tokens x beams per generate call at most. Unset: 16384 on CPU, 65536 on CUDA.",
        lo=16,
        hi=100_000_000,
    )
    max_attempts: int = _setting(
        "RAGQ_MAX_ATTEMPTS", 3, "Runs a job gets when its worker dies under it; then it fails (a poison job).", lo=1, hi=100
    )
    execution_ledger: Path | None = _setting(
        "RAGQ_EXECUTION_LEDGER", None, "File where workers append one JSON line per job run and per stored result."
    )
    max_batch_lines: int = _setting(
        "RAGQ_MAX_BATCH_LINES", 100_000, "Lines (requests) in one batch at most.", lo=1, hi=10_000_000
    )
    max_batch_bytes: int = _setting(
        "RAGQ_MAX_BATCH_BYTES", 200 * 1024 * 1024, "Largest batch file.", lo=1024, hi=4 * 1024 * 1024 * 1024
    )
    callback_secret: str | None = _setting(
        "RAGQ_CALLBACK_SECRET", None, "HMAC-SHA256 key signing batch callbacks. Unset: `callback_url` is refused.", secret=True
    )
    callback_allow_private: bool = _setting(
        "RAGQ_CALLBACK_ALLOW_PRIVATE", False, "Allow callback URLs on loopback or private networks (refused by default)."
    )
    callback_ports: str = _setting(
        "RAGQ_CALLBACK_PORTS", DEFAULT_CALLBACK_PORTS, "Ports a callback may go to on a public address (any port on an allowed private one)."
    )
    callback_deadline_s: float = _setting(
        "RAGQ_CALLBACK_DEADLINE_S", 10.0, "One callback attempt, connecting to reading the answer, at most.", lo=1, hi=120
    )
    callback_ca_file: Path | None = _setting(
        "RAGQ_CALLBACK_CA_FILE", None, "PEM bundle trusted for HTTPS callbacks instead of certifi's (an internal CA)."
    )
    api_keys: str | None = _setting(
        "RAGQ_API_KEYS", None, "API keys as `tenant:key,...` (for development; prefer a keys file).", secret=True
    )
    api_keys_file: Path | None = _setting(
        "RAGQ_API_KEYS_FILE", None, "File of `tenant sha256-of-key` lines, written by `ragq keys create`; re-read when it changes."
    )
    api_key: str | None = _setting(
        "RAGQ_API_KEY", None, "Key the `ragq` command-line client sends (`Authorization: Bearer`).", secret=True
    )
    max_outstanding_jobs: int = _setting(
        "RAGQ_MAX_OUTSTANDING_JOBS", 1_000_000, "Queued and running jobs (batch items included) per tenant at most; then 429.", lo=1, hi=1_000_000_000
    )
    rate_limit_per_min: int = _setting(
        "RAGQ_RATE_LIMIT_PER_MIN", 12_000, "`/v1` requests per tenant per minute at most; then 429.", lo=1, hi=1_000_000_000
    )
    max_open_batches: int = _setting(
        "RAGQ_MAX_OPEN_BATCHES", 100, "Batches per tenant not yet ended (in progress or cancelling) at most; then 429.", lo=1, hi=1_000_000
    )
    max_stored_batch_items: int = _setting(
        "RAGQ_MAX_STORED_BATCH_ITEMS",
        1_000_000,
        "Batch items per tenant kept in Redis at most, ended batches' items included until they expire; then 429.",
        lo=1,
        hi=1_000_000_000,
    )
    ended_batch_ttl_s: int = _setting(
        "RAGQ_ENDED_BATCH_TTL_S", 3600, "Seconds the items of a cancelled or expired batch are kept (finished ones: RAGQ_RESULT_TTL_S).", lo=60, hi=365 * 24 * 3600
    )
    max_concurrent_uploads: int = _setting(
        "RAGQ_MAX_CONCURRENT_UPLOADS", 4, "Batch uploads one API process parses at once; more get 503 with Retry-After.", lo=1, hi=1024
    )
    # OpenAI-compatible files and chat completions (api/files.py, api/openai_compat.py).
    max_file_bytes_per_tenant: int = _setting(
        "RAGQ_MAX_FILE_BYTES_PER_TENANT", 1024 * 1024 * 1024, "Bytes of uploaded files (`/v1/files`) a tenant may keep in Redis at once; then 429.",
        lo=1024, hi=1024 * 1024 * 1024 * 1024,
    )
    max_files_per_tenant: int = _setting(
        "RAGQ_MAX_FILES_PER_TENANT", 1000, "Uploaded files a tenant may keep at once; then 429.", lo=1, hi=100_000
    )
    file_ttl_s: int = _setting(
        "RAGQ_FILE_TTL_S", 7 * 24 * 3600, "Seconds an uploaded file is kept (deleted earlier by `DELETE /v1/files/<id>`).", lo=60, hi=365 * 24 * 3600
    )
    chat_timeout_s: int = _setting(
        "RAGQ_CHAT_TIMEOUT_S", 60, "Seconds `POST /v1/chat/completions` waits for its answer; then 504 and the job is cancelled.", lo=1, hi=600
    )
    fallback_tiny_model: bool = _setting(
        "RAGQ_FALLBACK_TINY_MODEL", False, "Serve a tiny local model when the configured one cannot be had."
    )
    # The worker registry (`GET /v1/models`, `ragq status`).
    worker_ttl_s: int = _setting(
        "RAGQ_WORKER_TTL_S", 15, "Seconds a dead worker stays listed in `/v1/models` at most (its entry's lifetime; refreshed every 2 s or a third of this).", lo=3, hi=600
    )
    # Metrics and usage (docs/design.md "Metrics", README "Operating ragq").
    metrics_port: int = _setting(
        "RAGQ_METRICS_PORT", 9100, "Port of each worker's Prometheus `/metrics` (0: off); a worker finding it taken tries the next 31.", lo=0, hi=65535
    )
    metrics_host: str = _setting("RAGQ_METRICS_HOST", "0.0.0.0", "Address each worker's `/metrics` listens on.")
    metrics_require_key: bool = _setting(
        "RAGQ_METRICS_REQUIRE_KEY", False, "The API's `/metrics` (which names tenants) answers only an admin tenant's key. Off: open, like `/healthz`."
    )
    admin_tenants: str | None = _setting(
        "RAGQ_ADMIN_TENANTS", None, "Tenants (comma-separated) whose keys see every tenant's `/v1/usage` and, with RAGQ_METRICS_REQUIRE_KEY, `/metrics`."
    )
    # Retrieval modes (docs/design.md "Retrieval modes").
    retrieval: str = _setting(
        "RAGQ_RETRIEVAL", "text", "Retrieval of a job that names none: `text` (minsearch), `vector` (embeddings) or `hybrid` (both fused). Workers load the embedding model at start unless `text`."
    )
    embedding_model: str = _setting(
        "RAGQ_EMBEDDING_MODEL",
        "sentence-transformers/all-MiniLM-L6-v2",
        "sentence-transformers model for vector and hybrid retrieval (id or local directory); runs on the worker's CPU.",
    )

    def __post_init__(self) -> None:
        if self.task_time_limit_s >= self.visibility_timeout_s:
            # Redis redelivers any unacknowledged message after the visibility timeout, so a job
            # allowed to run longer than that would be run twice while still running.
            raise ConfigError(
                f"RAGQ_TASK_TIME_LIMIT_S ({self.task_time_limit_s}) must be below "
                f"RAGQ_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s})"
            )
        names = [m.name for m in self.served_models]
        if len(set(names)) != len(names):
            raise ConfigError(f"RAGQ_MODELS repeats a model name: {', '.join(names)}")
        if self.api_keys is not None:
            try:
                parse_env_keys(self.api_keys)
            except ConfigError as exc:
                raise ConfigError(f"RAGQ_API_KEYS: {exc.message}") from None
        check_placement_settings(self.device, self.max_memory)
        if self.worker_model is not None and self.worker_model not in names:
            raise ConfigError(f"RAGQ_WORKER_MODEL {self.worker_model!r} is not served; served: {', '.join(names)}")
        if self.redis_min_replicas_acked and self.redis_url is None:
            # The embedded Redis (or the default local one) has no replicas: every submission would be refused.
            raise ConfigError("RAGQ_REDIS_MIN_REPLICAS_ACKED needs a REDIS_URL whose primary has replicas")

    @property
    def served_models(self) -> tuple[ModelSpec, ...]:
        """The default model first, then the others."""
        return (self.default_model, *self.extra_models)

    def model(self, name: str) -> ModelSpec:
        """The served model called `name`."""
        for spec in self.served_models:
            if spec.name == name:
                return spec
        raise ConfigError(f"model {name!r} is not served; served: {', '.join(self.model_names)}")

    @property
    def worker_spec(self) -> ModelSpec:
        """The model this process serves when it is a worker."""
        return self.model(self.worker_model or self.default_model.name)

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.served_models]

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or "redis://127.0.0.1:6379/0"

    def read_prompt_template(self) -> str | None:
        """The prompt template file's text, if one is configured."""
        if self.prompt_template is None:
            return None
        try:
            return Path(self.prompt_template).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"RAGQ_PROMPT_TEMPLATE_FILE cannot be read: {exc}") from exc

    def to_env(self) -> dict[str, str]:
        """Environment variables that rebuild these settings in a child process."""
        env: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            env[f.metadata["env"]] = _format(value)
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from the environment; unknown `RAGQ_*` variables are an error."""
        environ = os.environ if environ is None else environ
        known = {f.metadata["env"]: f for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for env_name, f in known.items():
            raw = environ.get(env_name)
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = _parse(f, raw.strip())
        return cls(**values)

    @classmethod
    def documented(cls) -> list[tuple[str, str, str, str]]:
        """(variable, default, limit, meaning) for every setting, as the README's table shows them."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default
            shown = "unset" if default is None else _format(default)
            lo, hi = f.metadata["lo"], f.metadata["hi"]
            limit = f"{lo}..{hi}" if lo is not None else ""
            rows.append((f.metadata["env"], shown, limit, f.metadata["help"]))
        return rows


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, ModelSpec):
        return value.to_text()
    if isinstance(value, tuple):
        return ",".join(v.to_text() for v in value)
    return str(value)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "default_model": parse_model_spec,
    "extra_models": parse_model_list,
    "data_dir": Path,
    "execution_ledger": Path,
    "api_keys_file": Path,
    "callback_ca_file": lambda raw: _readable_file(Path(raw)),
    "callback_ports": lambda raw: ",".join(str(port) for port in sorted(parse_ports(raw))),
    "admin_tenants": lambda raw: ",".join(parse_admin_tenants(raw)),
}


def _readable_file(path: Path) -> Path:
    # Checked at start, so a typo stops the worker at once instead of failing every HTTPS callback later.
    try:
        path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read it ({exc.strerror})") from exc
    return path


_CHOICES = {
    "dtype": {"auto", "float32", "bfloat16", "float16"},
    "engine": {"process", "thread"},
    "continuous_batching": {"auto", "off"},
    "retrieval": set(RETRIEVAL_MODES),
}


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    env_name = f.metadata["env"]
    try:
        if f.name in _PARSERS:
            return _PARSERS[f.name](raw)
        if f.name in _CHOICES:
            if raw not in _CHOICES[f.name]:
                raise ValueError(f"must be one of {', '.join(sorted(_CHOICES[f.name]))}")
            return raw
        if f.type in ("bool",):
            if raw.lower() not in {"1", "0", "true", "false", "yes", "no"}:
                raise ValueError("must be 1 or 0")
            return raw.lower() in {"1", "true", "yes"}
        if f.type in ("int", "int | None", "float", "float | None"):
            number = int(raw) if f.type.startswith("int") else float(raw)
            if not math.isfinite(number):
                raise ValueError("must be a finite number")
            lo, hi = f.metadata["lo"], f.metadata["hi"]
            if (lo is not None and number < lo) or (hi is not None and number > hi):
                raise ValueError(f"must be between {lo} and {hi}")
            return number
        if f.name == "redis_url":
            check_redis_url(raw)
        if f.name == "sentinel_master" and not SENTINEL_MASTER_NAME.fullmatch(raw):
            raise ValueError("must be 1..64 letters, digits, `.`, `_` or `-`")
        return raw
    except ConfigError as exc:
        raise ConfigError(f"{env_name}: {exc.message}") from exc
    except ValueError as exc:
        # A secret's value (REDIS_URL carries a password) never goes into the message: it ends up in logs.
        shown = f"={raw!r}" if f.repr else ""
        raise ConfigError(f"{env_name}{shown}: {exc}") from exc
