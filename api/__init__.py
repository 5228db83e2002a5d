"""The HTTP front end: validates requests, stores jobs in Redis, enqueues them by task name. No torch here."""

from __future__ import annotations

from flask import Flask, request

from shared.config import Settings
from shared.errors import ValidationFailed


def create_app(config: Settings | None = None) -> Flask:
    """The Flask app; `config` defaults to settings read from the environment."""
    from api import batches, callbacks, errors, health, jobs, openapi, state, tenancy
    from api import metrics, models, usage

    settings = config if config is not None else Settings.from_env()
    # No app-wide /static route: the dashboard's blueprint serves api/static with the page's security headers.
    app = Flask(__name__, static_folder=None)
    # Flask refuses larger bodies with 413 before a view reads them.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    state.init_app(app, settings)
    errors.init_app(app)
    # Metrics and usage (docs/design.md "Metrics"): before tenancy, so refused requests are timed and counted too.
    metrics.init_app(app, settings)
    app.register_blueprint(usage.bp)
    tenancy.init_app(app, settings)
    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(batches.bp)
    app.register_blueprint(callbacks.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(models.bp)
    # OpenAI-compatible routes (files, chat completions); batches from files go through batches.bp.
    from api import files, openai_compat

    app.register_blueprint(files.bp)
    app.register_blueprint(openai_compat.bp)

    # The operator's live page at /dashboard (and /), reading the JSON API (api/dashboard.py).
    from api import dashboard

    app.register_blueprint(dashboard.bp)
    app.before_request(_reject_unknown_query_parameters)
    return app


# Query parameters each /v1 endpoint takes: anything else is refused, as unknown body fields are.
QUERY_PARAMETERS: dict[str, frozenset[str]] = {
    "jobs.read": frozenset({"wait"}),
    "batches.create": frozenset({"model", "completion_window", "metadata", "params", "callback_url", "retrieval", "evaluate"}),
    "batches.listing": frozenset({"limit", "after"}),
    "batches.results": frozenset({"status", "merged"}),
    "batches.retry": frozenset({"error_type"}),
    "files.listing": frozenset({"purpose", "limit"}),
    "usage.read": frozenset({"granularity", "start", "end"}),
}


def _reject_unknown_query_parameters() -> None:
    if request.endpoint is None or not request.path.startswith("/v1/"):
        return
    unknown = sorted(set(request.args) - QUERY_PARAMETERS.get(request.endpoint, frozenset()))
    if unknown:
        raise ValidationFailed("unknown query parameter(s)", details=[{"field": name, "message": "not allowed here"} for name in unknown])
