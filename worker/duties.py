"""The background duties of a worker process, started and stopped together (see each duty's module)."""

from __future__ import annotations

from shared.batch_store import BatchStore
from shared.broker import make_celery
from shared.config import Settings
from shared.store import JobStore
from worker.housekeeping import Housekeeper


class Duties:
    """The running duties of one worker process."""

    def __init__(self, housekeeper: Housekeeper) -> None:
        self.housekeeper = housekeeper

    def stop(self) -> None:
        """Ask every duty's thread to stop (they are daemon threads: a stopping process does not wait for them)."""
        self.housekeeper.stop()


def start_duties(settings: Settings, store: JobStore, worker_name: str, feed_depth: int) -> Duties:
    """Say this worker is alive, then start its background duties for the model `settings.worker_spec`."""
    housekeeper = Housekeeper(
        BatchStore(store),
        make_celery(settings),
        settings.worker_spec.name,
        feed_depth,
        settings.callback_secret,
        worker_name=worker_name,
        max_attempts=settings.max_attempts,
        task_time_limit_s=settings.task_time_limit_s,
        callback_allow_private=settings.callback_allow_private,
    )
    housekeeper.heartbeat()
    housekeeper.start()
    return Duties(housekeeper)
