"""Child processes: the environment they start with, and stopping each one's process group.

Every child (a worker, the API, a benchmark's stack) is started with `start_new_session=True`, so it leads a
process group that also holds what it starts itself (Celery's pool, gunicorn's workers); stopping the group
stops them all. The supervisor, the tests and the benchmarks all stop children through `stop_groups`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable

from shared.config import ENV_PREFIX, Settings

STOP_GRACE_S = 30


def child_env(settings: Settings | None = None, **extra: str) -> dict[str, str]:
    """This process's environment without its own ragq settings (RAGQ_*, REDIS_URL), plus `settings` and `extra`."""
    # A child must see exactly the settings it is given, not a leftover RAGQ_* of the shell that started us.
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "REDIS_URL"}
    if settings is not None:
        env.update(settings.to_env())
    env.update(extra)
    return env


def signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` to the process group `process` leads; a group already gone is not an error."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def stop_groups(processes: Iterable[subprocess.Popen[bytes]], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every process's group, wait up to `grace_s` for them all, then SIGKILL each group and reap."""
    processes = list(processes)
    for process in processes:
        signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        # Always: it also ends pool processes whose parent has already exited.
        signal_group(process, signal.SIGKILL)
        process.wait()
