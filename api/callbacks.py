"""`GET /v1/callbacks/secret`: the calling tenant's secret for verifying its batch callbacks."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from api import state, tenancy
from shared.callback_signing import SIGNATURE_HEADER, TOLERANCE_S, tenant_secret
from shared.errors import NotFound

bp = Blueprint("callbacks", __name__)


@bp.get("/v1/callbacks/secret")
def secret() -> dict[str, Any]:
    """The tenant's callback signing secret (derived from `RAGQ_CALLBACK_SECRET`) and how signatures look."""
    operator_secret = state.get().settings.callback_secret
    if not operator_secret:
        raise NotFound("callbacks are not configured on this server (RAGQ_CALLBACK_SECRET is unset)")
    return {
        "secret": tenant_secret(operator_secret, tenancy.tenant()),
        "header": SIGNATURE_HEADER,
        "scheme": "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<body>' keyed with secret>",
        "tolerance_s": TOLERANCE_S,
    }
