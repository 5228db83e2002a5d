"""Liveness and readiness probes (not under /v1, never authenticated)."""

from __future__ import annotations

from flask import Blueprint

from api import state
from shared.errors import Unavailable

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> dict[str, str]:
    """Redis answers: the API can accept jobs."""
    try:
        state.get().store.redis.ping()
    except Exception as exc:
        raise Unavailable("the job store (Redis) is unavailable") from exc
    return {"status": "ready"}
