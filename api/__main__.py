"""`python -m api [--host H] [--port P] [--processes N]`: the HTTP API under gunicorn.

This is the process `ragq api` and `ragq serve` start.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from shared.config import Settings
from shared.errors import RagqError


def build_parser() -> argparse.ArgumentParser:
    """The API's options (the same as `ragq api`'s)."""
    parser = argparse.ArgumentParser(prog="python -m api", description="Run the HTTP API under gunicorn.")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--processes", type=int, default=1, help="gunicorn worker processes (default 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the API until stopped; a configuration error prints one line and exits 2."""
    from api.server import run

    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        overrides = {name: value for name, value in (("host", args.host), ("port", args.port)) if value is not None}
        run(dataclasses.replace(settings, **overrides) if overrides else settings, processes=args.processes)
    except RagqError as exc:
        print(f"ragq: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
