"""An optional execution ledger: one JSON line per job run and per stored result, in a local file.

It lives outside Redis on purpose: it is how `bench.chaos` (and an operator auditing a night's work) counts
executions and results independently of the store it is checking.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class Ledger:
    """Appends events to a file shared by many worker processes (each line is one `write` in append mode)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def record(self, event: str, job_id: str, worker: str, **extra: str) -> None:
        if self.path is None:
            return
        line = json.dumps({"event": event, "job_id": job_id, "worker": worker, "t": time.time(), **extra}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
