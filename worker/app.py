"""The worker's Celery app: the answer task, and the model loaded in each pool process at its start."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery import Celery, signals

from shared import keys
from shared.broker import ANSWER_TASK, make_celery
from shared.config import Settings
from shared.errors import RagqError
from worker import runtime
from worker.tasks import run_job

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> Celery:
    """A Celery app that consumes only the queue of `settings.worker_spec`."""
    app = make_celery(settings)
    # A plain `celery -A worker.main worker` consumes the default queue: this worker's model's.
    app.conf.task_default_queue = keys.model_queue(settings.worker_spec.name)

    @app.task(name=ANSWER_TASK, bind=True)
    def answer(self: Any, job_id: str) -> str | None:
        status = run_job(runtime.current(settings), job_id, self.request.hostname or "worker")
        return None if status is None else status.value

    def load_in_pool_process(**_: Any) -> None:
        # Runs in each forked pool process, never in the parent: CUDA state does not survive a fork.
        try:
            runtime.start(settings)
        except RagqError as exc:
            log.error("ragq worker: %s", exc.message)
            # Without the model this worker is useless; stop the whole worker instead of respawning.
            os.kill(os.getppid(), signal.SIGTERM)
            os._exit(1)

    signals.worker_process_init.connect(load_in_pool_process, weak=False)
    return app
