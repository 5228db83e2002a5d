"""The API's resources (settings, job store, Celery producer), owned here and reached through `get()`."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import Flask, current_app

from api.waits import JobEvents
from shared.broker import make_celery
from shared.config import Settings
from shared.jobs import RequestModels, request_models_for
from shared.store import JobStore, connect


@dataclass(frozen=True)
class ApiState:
    settings: Settings
    store: JobStore
    celery: Celery
    requests: RequestModels
    events: JobEvents


def init_app(app: Flask, settings: Settings) -> None:
    """Create the resources once per app; connections open lazily on first use."""
    # Long-polls hold no connection of this pool (they wait on `events`'s one subscription).
    client = connect(
        settings.effective_redis_url,
        threads=settings.api_threads,
        sentinel_master=settings.sentinel_master,
        sentinel_password=settings.sentinel_password,
    )
    app.extensions["ragq"] = ApiState(
        settings=settings,
        store=JobStore(client, settings.result_ttl_s),
        celery=make_celery(settings),
        requests=request_models_for(settings),
        events=JobEvents(client, settings.max_waits_per_tenant),
    )


def get() -> ApiState:
    """The current app's resources."""
    state: ApiState = current_app.extensions["ragq"]
    return state
