"""Long-polls (`GET /v1/jobs/<id>?wait=N`) of one API process, parked on one shared Redis subscription.

A waiter costs an `Event` here, never a Redis connection or (under gunicorn's gevent worker) a thread: one
listener per process subscribes to every job's events channel and wakes the waiters of the job named. Each
tenant may have at most `RAGQ_MAX_WAITS_PER_TENANT` waits in flight per process; one more is a 429.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from shared import redis_keys
from shared.errors import TooManyRequests

log = logging.getLogger(__name__)

# How long the listener blocks on its connection before checking it should still run.
LISTEN_TICK_S = 1.0
# The listener unsubscribes and ends after this long without waiters (the next wait starts it again).
IDLE_STOP_S = 30.0
# After the subscription breaks (Redis restarted): how long to wait before subscribing again.
RESUBSCRIBE_DELAY_S = 0.5
# How long a first waiter waits for the subscription to be confirmed before giving up (503 via redis errors).
SUBSCRIBE_TIMEOUT_S = 5.0
# A tenant over its cap tries again soon: waits end within MAX_WAIT_S.
WAIT_CAP_RETRY_AFTER_S = 5


class Notice:
    """One waiter's wake-up call for one job."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def wait(self, timeout_s: float) -> bool:
        """True if the job changed (or the subscription broke, so it must be read again) within `timeout_s`."""
        woke = self._event.wait(timeout_s)
        self._event.clear()
        return woke

    def wake(self) -> None:
        self._event.set()


class JobEvents:
    """The waiters of one process by job id, and the one listener that wakes them."""

    def __init__(self, client: redis.Redis, max_waits_per_tenant: int) -> None:
        self._client = client
        self._max_waits_per_tenant = max_waits_per_tenant
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Notice]] = {}
        self._per_tenant: Counter[str] = Counter()
        self._listener: threading.Thread | None = None
        self._listener_pid: int | None = None
        self._subscribed = threading.Event()

    @contextmanager
    def slot(self, tenant: str) -> Iterator[None]:
        """Count one wait against `tenant`'s cap (429 beyond it) for the duration of the block."""
        with self._lock:
            if self._per_tenant[tenant] >= self._max_waits_per_tenant:
                raise TooManyRequests(
                    f"more than {self._max_waits_per_tenant} long-polls of yours are waiting; poll without `wait` or retry",
                    retry_after_s=WAIT_CAP_RETRY_AFTER_S,
                    details={"max_waits_per_tenant": self._max_waits_per_tenant},
                )
            self._per_tenant[tenant] += 1
        try:
            yield
        finally:
            with self._lock:
                self._per_tenant[tenant] -= 1
                if not self._per_tenant[tenant]:
                    del self._per_tenant[tenant]

    @contextmanager
    def listen(self, job_id: str) -> Iterator[Notice]:
        """A `Notice` woken by every event of `job_id` published after this returns."""
        notice = Notice()
        try:
            with self._lock:
                self._waiters.setdefault(job_id, set()).add(notice)
                self._start_listener()
            if not self._subscribed.wait(SUBSCRIBE_TIMEOUT_S):
                raise redis.exceptions.ConnectionError("could not subscribe to job events in time")
            yield notice
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(notice)
                    if not waiters:
                        del self._waiters[job_id]

    def waiting(self) -> int:
        """How many waits are registered now."""
        with self._lock:
            return sum(len(w) for w in self._waiters.values())

    def _start_listener(self) -> None:
        # Called with the lock held. Started lazily, in the process that serves (gunicorn forks after the
        # app is built), and ended by itself once nobody waits (`_stop_if_idle`).
        if self._listener is None or self._listener_pid != os.getpid():
            self._subscribed.clear()
            self._listener_pid = os.getpid()
            self._listener = threading.Thread(target=self._listen, name="ragq-job-events", daemon=True)
            self._listener.start()

    def _stop_if_idle(self, idle_since: float | None) -> bool:
        """End the listener if nobody waits (for IDLE_STOP_S, or at all after an error: idle_since None)."""
        with self._lock:
            if self._waiters or (idle_since is not None and time.monotonic() - idle_since < IDLE_STOP_S):
                return False
            self._listener = None
            self._subscribed.clear()
            return True

    def _listen(self) -> None:
        pattern = redis_keys.all_job_events()
        while True:
            pubsub = self._client.pubsub()
            try:
                pubsub.psubscribe(pattern)
                idle_since = time.monotonic()
                while True:
                    message = pubsub.get_message(timeout=LISTEN_TICK_S)
                    if message is not None and message["type"] == "psubscribe":
                        self._subscribed.set()
                    elif message is not None and message["type"] == "pmessage":
                        self._wake(redis_keys.job_id_of_events(message["channel"]))
                    with self._lock:
                        waiting = bool(self._waiters)
                    if waiting:
                        idle_since = time.monotonic()
                    elif self._stop_if_idle(idle_since):
                        return
            except Exception as exc:  # the listener must outlive a Redis outage while anyone waits
                self._subscribed.clear()
                # Events may have been missed: every waiter reads its job again (and fails with 503 if Redis is down).
                self._wake_all()
                if self._stop_if_idle(None):
                    return
                log.warning("job events subscription broke, subscribing again: %s", exc)
                time.sleep(RESUBSCRIBE_DELAY_S)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass

    def _wake(self, job_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for notice in waiters:
            notice.wake()

    def _wake_all(self) -> None:
        with self._lock:
            waiters = [n for ws in self._waiters.values() for n in ws]
        for notice in waiters:
            notice.wake()
