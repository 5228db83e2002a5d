"""Run the API under gunicorn with threads: each long-poll holds one thread while it waits."""

from __future__ import annotations

import sys
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from api import create_app
from shared.config import MAX_WAIT_S, Settings
from shared.api_keys import UNAUTHENTICATED_NOTICE


class GunicornServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.application


def run(settings: Settings, processes: int = 1) -> None:
    """Serve the API on `settings.host:settings.port` until stopped."""
    app = create_app(settings)
    if not app.extensions["ragq-keys"].enabled:
        print(f"ragq api: {UNAUTHENTICATED_NOTICE}", file=sys.stderr, flush=True)
    options = {
        "bind": f"{settings.host}:{settings.port}",
        "workers": processes,
        "worker_class": "gthread",
        "threads": settings.api_threads,
        # A long-poll may legitimately hold a request for MAX_WAIT_S seconds.
        "timeout": MAX_WAIT_S + 30,
        "graceful_timeout": 10,
        "keepalive": 5,
        # Batch options may come as a query string (metadata and params as JSON): allow gunicorn's maximum.
        "limit_request_line": 8190,
        "accesslog": "-",
        "loglevel": "info",
    }
    GunicornServer(app, options).run()
