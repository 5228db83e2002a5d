"""What the API's and the workers' Prometheus metrics share: names of label values, histogram buckets, the
multiprocess switch and the worker's port search.

Nothing here imports prometheus_client: `multiprocess_dir_for` must run before it is first imported, since the
library chooses between in-memory and shared-file values at import. The metrics themselves live in
`api.metrics` and `worker.metrics`; docs/design.md "Metrics" has the design.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import cache
from typing import Any

# prometheus_client's switch: set, counters and histograms of every process go to files in that directory and
# a scrape of any one process adds them up.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

QUEUES = ("interactive", "backlog")
PRIORITIES = QUEUES
FINISHED_STATUSES = ("succeeded", "failed", "cancelled", "expired")
CALLBACK_OUTCOMES = ("sent", "failed")
JOB_KINDS = ("job", "batch_item")
# Methods outside these are counted as "other", so a client cannot make up label values.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Seconds. An API request: a plain read takes milliseconds, a long-poll up to 60 s, a large upload longer.
REQUEST_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# One `generate` call: milliseconds for a tiny model, seconds for a microbatch of 128 on a GPU, minutes offloaded.
GENERATE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
# From submission to a worker's claim: milliseconds for an interactive job, hours for the tail of a backlog.
QUEUE_WAIT_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400)
# Jobs in a microbatch: powers of two up to the largest RAGQ_MAX_BATCH_SIZE.
MICROBATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# A worker whose RAGQ_METRICS_PORT is taken (another worker on the same host) tries the next ports, this many.
PORT_TRIES = 32


def multiprocess_dir_for(processes: int) -> str | None:
    """With several API processes, a fresh directory where they share their counts (set in the environment, so
    the processes gunicorn forks inherit it), removed at exit; an operator's own PROMETHEUS_MULTIPROC_DIR is
    emptied and kept. None (and nothing changed) for one process. Call before prometheus_client is imported."""
    existing = os.environ.get(MULTIPROC_ENV)
    if existing:
        # Files of an earlier run would be added to this one's counts.
        for name in os.listdir(existing):
            if name.endswith(".db"):
                os.unlink(os.path.join(existing, name))
        return existing
    if processes <= 1:
        return None
    directory = tempfile.mkdtemp(prefix="ragq-api-metrics-")
    creator = os.getpid()

    def remove() -> None:
        # gunicorn's forked processes inherit this handler and run it when they exit: only the master removes.
        if os.getpid() == creator:
            shutil.rmtree(directory, ignore_errors=True)

    atexit.register(remove)
    os.environ[MULTIPROC_ENV] = directory
    return directory


@cache
def redis_errors_counter() -> Any:
    """`ragq_redis_errors_total{component}`, which the API and the workers both count: made once per process (a
    test imports both sides), on first use, so that importing this module leaves prometheus_client unimported."""
    from prometheus_client import Counter

    return Counter("ragq_redis_errors", "Redis errors met, by the part of ragq that met them.", ["component"])
