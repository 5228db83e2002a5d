"""Run the API under gunicorn's gevent worker: each connection is a greenlet, so long-polls cost no thread.

gunicorn's gevent worker monkey-patches the standard library (sockets, threading) when the worker process
starts, so redis-py's sockets and locks yield to other greenlets. The app is therefore built in the worker,
after patching (`load`): locks and queues made before patching would block the whole process.
"""

from __future__ import annotations

import sys
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from api import create_app
from shared.config import Settings
from shared.api_keys import UNAUTHENTICATED_NOTICE
from shared.metrics import multiprocess_dir_for


class GunicornServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return create_app(self.settings)


def gunicorn_options(settings: Settings, processes: int) -> dict[str, Any]:
    """How `ragq api` runs gunicorn (the README shows the same as a `gunicorn` command line)."""
    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": processes,
        # Greenlets, not threads: a long-poll parks on the process's one job-events subscription.
        "worker_class": "gevent",
        "worker_connections": settings.api_max_connections,
        # With the gevent worker this bounds reading each request head, the first one included, so a client
        # that opens a connection and never finishes its headers is cut off (and an idle keep-alive one).
        "keepalive": settings.header_timeout_s,
        # Heartbeat: a worker process whose event loop is stuck this long is replaced.
        "timeout": 30,
        "graceful_timeout": 10,
        "backlog": 2048,
        # Batch options may come as a query string (metadata and params as JSON): allow gunicorn's maximum.
        "limit_request_line": 8190,
        "accesslog": "-",
        "loglevel": "info",
    }


def run(settings: Settings, processes: int = 1) -> None:
    """Serve the API on `settings.host:settings.port` until stopped."""
    # Before prometheus_client is imported (by create_app): several processes share their counts through files.
    multiprocess_dir_for(processes)
    # Built once here only to refuse a bad configuration before gunicorn starts; each worker builds its own.
    app = create_app(settings)
    if not app.extensions["ragq-keys"].enabled:
        print(f"ragq api: {UNAUTHENTICATED_NOTICE}", file=sys.stderr, flush=True)
    del app
    GunicornServer(settings, gunicorn_options(settings, processes)).run()
