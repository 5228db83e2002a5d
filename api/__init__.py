"""The HTTP front end: validates requests, stores jobs in Redis, enqueues them by task name. No torch here."""

from __future__ import annotations

from flask import Flask, request

from shared.config import Settings
from shared.errors import ValidationFailed


def create_app(config: Settings | None = None) -> Flask:
    """The Flask app; `config` defaults to settings read from the environment."""
    from api import batches, callbacks, errors, health, jobs, openapi, state, tenancy

    settings = config if config is not None else Settings.from_env()
    app = Flask(__name__)
    # Flask refuses larger bodies with 413 before a view reads them.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    state.init_app(app, settings)
    errors.init_app(app)
    tenancy.init_app(app, settings)
    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(batches.bp)
    app.register_blueprint(callbacks.bp)
    app.register_blueprint(openapi.bp)
    app.before_request(_reject_unknown_query_parameters)
    return app


# Query parameters each /v1 endpoint takes: anything else is refused, as unknown body fields are.
QUERY_PARAMETERS: dict[str, frozenset[str]] = {
    "jobs.read": frozenset({"wait"}),
    "batches.create": frozenset({"model", "completion_window", "metadata", "params", "callback_url", "retrieval", "evaluate"}),
    "batches.listing": frozenset({"limit", "after"}),
    "batches.results": frozenset({"status"}),
}


def _reject_unknown_query_parameters() -> None:
    if request.endpoint is None or not request.path.startswith("/v1/"):
        return
    unknown = sorted(set(request.args) - QUERY_PARAMETERS.get(request.endpoint, frozenset()))
    if unknown:
        raise ValidationFailed("unknown query parameter(s)", details=[{"field": name, "message": "not allowed here"} for name in unknown])
