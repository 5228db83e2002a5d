"""The background duties of a worker process, each on a thread of its own, started and stopped together.

A duty is a small class in a module of its own (`expiry`, `callbacks`, `liveness`, `audit`) that says
what one round of it does (`step`) and how often it runs; `PeriodicLoop` is the one loop that runs any of them.
A thread per duty means a slow round of one (expiring a 100,000-item batch takes seconds) never delays another:
above all not the heartbeat, whose lapse gets this worker's jobs run again elsewhere.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import redis

from shared.batch_store import BatchStore
from shared.broker import make_celery
from shared.config import Settings
from shared.store import JobStore
from worker.audit import MessageAudit
from worker.callbacks import CallbackSender
from worker.expiry import Expiry
from worker import metrics as worker_metrics
from worker.liveness import Heartbeat, Reaper
from worker.registry import WorkerActivity, WorkerRegistration, registration_for

log = logging.getLogger(__name__)

# After a failed round (Redis down, say) a loop waits this long before the next, instead of spinning.
ERROR_PAUSE_S = 1.0


class Duty(Protocol):
    """What `PeriodicLoop` needs of a duty."""

    thread_name: str
    every_s: float
    first_wait_s: float

    def step(self) -> bool:
        """Do one round; True when more work is waiting, so the next round starts at once."""
        ...


class PeriodicLoop:
    """Runs `step` on a named daemon thread: at once again while it reports more work, else every `every_s`
    seconds, until `stop` is set. A round that raises is logged and retried after `error_pause_s`."""

    def __init__(
        self,
        name: str,
        step: Callable[[], bool],
        every_s: float,
        stop: threading.Event,
        first_wait_s: float = 0.0,
        error_pause_s: float = ERROR_PAUSE_S,
    ) -> None:
        self.step = step
        self.every_s = every_s
        self.stop = stop
        self.first_wait_s = first_wait_s
        self.error_pause_s = error_pause_s
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the loop's thread."""
        self.thread.start()

    def _run(self) -> None:
        wait_s = self.first_wait_s
        while not self.stop.wait(wait_s):
            try:
                more = self.step()
            except Exception as exc:
                # Redis may be down for a while; the loops must outlive that.
                worker_metrics.error(exc, self.thread.name)
                log.exception("%s: housekeeping error; retrying", self.thread.name)
                wait_s = self.error_pause_s
                continue
            wait_s = 0.0 if more else self.every_s


@dataclass
class Duties:
    """The duties of one worker process; `start` runs each on its own thread."""

    heartbeat: Heartbeat
    expiry: Expiry
    callbacks: CallbackSender
    reaper: Reaper
    audit: MessageAudit
    # This worker's entry in the live registry (`GET /v1/models`) and the counters behind it.
    registration: WorkerRegistration
    loops: list[PeriodicLoop] = field(default_factory=list, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        store: JobStore,
        worker_name: str,
        registration: WorkerRegistration | None = None,
    ) -> Duties:
        """The duties of worker `worker_name` serving the model `settings.worker_spec`, not yet started;
        `registration` describes it in the registry (by default, with its model and name only)."""
        batches = BatchStore(store)
        celery = make_celery(settings)
        model_name = settings.worker_spec.name
        return cls(
            heartbeat=Heartbeat(store.redis, worker_name),
            expiry=Expiry(batches),
            callbacks=CallbackSender(
                batches,
                settings.callback_secret,
                settings.callback_allow_private,
                callback_ports=settings.callback_ports,
                deadline_s=settings.callback_deadline_s,
                ca_file=settings.callback_ca_file,
            ),
            reaper=Reaper(store, celery, worker_name, settings.max_attempts, settings.task_time_limit_s),
            audit=MessageAudit(store, celery, model_name),
            registration=registration or registration_for(store.redis, model_name, worker_name, settings.worker_ttl_s),
        )

    def all(self) -> list[Duty]:
        """Every duty, the heartbeat first."""
        return [self.heartbeat, self.expiry, self.callbacks, self.reaper, self.audit, self.registration]

    @property
    def activity(self) -> WorkerActivity:
        """Where the task threads count the jobs this worker ends (written to Redis by the registration)."""
        return self.registration.activity

    def start(self) -> None:
        """Say this worker is alive (raises if Redis is down), then start every duty's loop."""
        self.heartbeat.step()
        for duty in self.all():
            loop = PeriodicLoop(duty.thread_name, duty.step, duty.every_s, self._stop, duty.first_wait_s)
            loop.start()
            self.loops.append(loop)

    def stop(self) -> None:
        """Ask every duty's thread to stop (they are daemon threads: a stopping process does not wait for them),
        and leave the worker registry."""
        self._stop.set()
        try:
            self.registration.deregister()
        except redis.RedisError as exc:
            # The entry then expires on its own within RAGQ_WORKER_TTL_S.
            log.warning("could not leave the worker registry: %s", exc)


def start_duties(
    settings: Settings, store: JobStore, worker_name: str, registration: WorkerRegistration | None = None
) -> Duties:
    """Say this worker is alive, then start its background duties for the model `settings.worker_spec`."""
    duties = Duties.from_settings(settings, store, worker_name, registration)
    duties.start()
    return duties
