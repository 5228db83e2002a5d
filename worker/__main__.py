"""`python -m worker [--model M] [--loglevel L]`: one Celery worker consuming one model's queue.

This is the process `ragq worker` and `ragq serve` start. It checks cheaply, once, that the corpus loads and the
model's config can be read, so that a wrong path fails with one line instead of in every pool thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from shared.config import Settings
from shared.errors import RagqError


def build_parser() -> argparse.ArgumentParser:
    """The worker's options (the same as `ragq worker`'s)."""
    parser = argparse.ArgumentParser(prog="python -m worker", description="Run a Celery worker for one model's queue.")
    parser.add_argument("--model", help="served model name (default RAGQ_WORKER_MODEL or the default model)")
    parser.add_argument("--loglevel", default="INFO")
    return parser


def run(model: str | None, loglevel: str) -> int:
    """Check the corpus and the model, then consume until stopped; 2 for a configuration or model error."""
    from worker.app import create_app
    from worker.corpus import load_documents
    from worker.model_check import check_model

    settings = Settings.from_env()
    if model is not None:
        settings = dataclasses.replace(settings, worker_model=model)
    spec = settings.worker_spec
    load_documents(settings.documents, settings.data_dir)
    problem = check_model(spec)
    if problem and not settings.fallback_tiny_model:
        print(f"ragq: model {spec.name} ({spec.source}) cannot be loaded: {problem}", file=sys.stderr)
        return 2
    app = create_app(settings)
    node = "".join(c if c.isalnum() or c in "-_." else "-" for c in spec.name)
    # Celery's node name is the worker's one name: jobs record it, its heartbeat and job set carry it.
    worker_name = f"ragq-{node}-{os.getpid()}@%h"
    # Gossip and mingle only cost messages here: workers never coordinate with each other.
    app.worker_main(
        ["worker", f"--loglevel={loglevel}", f"--hostname={worker_name}", "--without-gossip", "--without-mingle"]
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options and run the worker; a configuration error prints one line and exits 2."""
    args = build_parser().parse_args(argv)
    try:
        return run(args.model, args.loglevel)
    except RagqError as exc:
        print(f"ragq: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
