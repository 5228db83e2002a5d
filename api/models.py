"""`/v1/models`: every served model with its live workers, queues, throughput, and the caller's batches and failures.

OpenAI's list shape (`{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}`), so OpenAI
clients that list models keep working, with ragq's fields added to each model (see `shared.overview`). Models,
workers and queues are visible to any key holder; batches and failures only to their own tenant.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint

from api import state, tenancy
from shared.errors import ModelNotFound
from shared.overview import models_overview

bp = Blueprint("models", __name__, url_prefix="/v1/models")

# A model's `created` when none of its workers is live: when this API process started (OpenAI's field is required).
STARTED_AT = int(time.time())


@bp.get("")
def listing() -> dict[str, Any]:
    """Every served model, the default first."""
    api = state.get()
    return {"object": "list", "data": models_overview(api.store.redis, api.settings.model_names, tenancy.tenant(), STARTED_AT)}


@bp.get("/<path:name>")
def read(name: str) -> dict[str, Any]:
    """One served model; 404 `model_not_found` for a name that is not served."""
    api = state.get()
    if name not in api.settings.model_names:
        raise ModelNotFound(f"no served model is called {name!r}", details={"served": api.settings.model_names})
    [model] = models_overview(api.store.redis, [name], tenancy.tenant(), STARTED_AT)
    return model
