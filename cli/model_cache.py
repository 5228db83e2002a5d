"""Is a hub model in the local Hugging Face cache, and can the hub be reached? Answered in a second, before any
process loads or downloads anything.

Without this, a worker asked for a model that is neither cached nor downloadable finds out only after the hub
client's retries (a dozen log lines over some 25 s). Here the cache is read first (no network), then the hub is
asked once, with a short timeout and no retries. Imports huggingface_hub (cheap, and never torch/transformers).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

import requests

# One HEAD request to the hub endpoint, no retries: a live hub answers in well under this.
HUB_PROBE_TIMEOUT_S = 3
# `org/name` or `name`: what the hub accepts as a repository id (and what is not a local path).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_TRUE = {"1", "on", "yes", "true"}
DEFAULT_ENDPOINT = "https://huggingface.co"


class CacheState(enum.Enum):
    """Where a model's files would come from."""

    NOT_HUB = "not_hub"  # a local directory or a simulated model: nothing to download
    CACHED = "cached"  # config and weights in the local hub cache
    DOWNLOADABLE = "downloadable"  # not cached, but the hub answers: the workers download it
    UNAVAILABLE = "unavailable"  # not cached and the hub cannot be reached


@dataclass(frozen=True)
class CacheReport:
    """The answer for one model source."""

    state: CacheState
    hub_reachable: bool
    why_unreachable: str = ""


def hub_repo_id(source: str) -> str | None:
    """`source` if it names a hub repository, None for a local path or a simulated model (`sim:NAME`)."""
    if source.startswith(("/", ".", "~", "sim:")) or Path(source).exists():
        return None
    return source if _REPO_ID.match(source) else None


def hub_offline(env: dict[str, str]) -> bool:
    """Whether `env` tells the hub client to stay offline (HF_HUB_OFFLINE, or transformers' TRANSFORMERS_OFFLINE)."""
    return any(env.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_cached(repo_id: str, cache: Path) -> bool:
    """Whether the hub cache `cache` holds a snapshot of `repo_id` with its config and at least one weights file."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return "config.json" in names and any(n.endswith(WEIGHT_SUFFIXES) for n in names)


def cache_dir(env: dict[str, str]) -> Path:
    """The hub cache a child started with `env` uses, resolved as huggingface_hub resolves it."""
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = env.get("HF_HOME") or str(Path(env.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface")
    return Path(home).expanduser() / "hub"


def hub_endpoint(env: dict[str, str]) -> str:
    """The hub a child started with `env` asks (HF_ENDPOINT, else huggingface.co)."""
    return (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def probe_hub(env: dict[str, str]) -> str:
    """'' when the hub endpoint answers, else why not (offline setting, no connection)."""
    if hub_offline(env):
        return "HF_HUB_OFFLINE is set"
    endpoint = hub_endpoint(env)
    try:
        # Any HTTP answer, even an error status, means the hub can be reached.
        requests.head(endpoint, timeout=HUB_PROBE_TIMEOUT_S, allow_redirects=False)
    except requests.RequestException as exc:
        return f"{endpoint} cannot be reached ({type(exc).__name__})"
    return ""


def check_cache(source: str, env: dict[str, str]) -> CacheReport:
    """Where `source`'s files would come from: the cache is read first, then the hub is asked once."""
    repo_id = hub_repo_id(source)
    if repo_id is None:
        return CacheReport(CacheState.NOT_HUB, hub_reachable=not hub_offline(env))
    cached = is_cached(repo_id, cache_dir(env))
    why = probe_hub(env)
    if cached:
        return CacheReport(CacheState.CACHED, hub_reachable=not why, why_unreachable=why)
    if why:
        return CacheReport(CacheState.UNAVAILABLE, hub_reachable=False, why_unreachable=why)
    return CacheReport(CacheState.DOWNLOADABLE, hub_reachable=True)

