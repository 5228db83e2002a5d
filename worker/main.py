"""Entry module for `celery -A worker.main worker`: builds the settings from the environment."""

from __future__ import annotations

import sys

from shared.config import Settings
from shared.errors import ConfigError
from worker.app import create_app

try:
    settings = Settings.from_env()
except ConfigError as exc:
    sys.exit(f"ragq: configuration error: {exc.message}")

app = create_app(settings)
