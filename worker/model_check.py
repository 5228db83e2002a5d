"""A cheap check that a model can be had, before any process loads its weights.

`python -m worker.model_check SOURCE` runs the check in a process of its own, for a caller that must not import
transformers (and with it torch), such as the `ragq serve` parent: it prints why the model cannot be had and
exits 1, or prints nothing and exits 0.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from shared.models import ModelSpec

EXIT_UNAVAILABLE = 1


def check_model(spec: ModelSpec) -> str | None:
    """Why `spec`'s model cannot be had (its config cannot be read), or None. Loads no weights."""
    return check_source(spec.source)


def check_source(source: str) -> str | None:
    """Why the model at `source` (a hub id, a directory or a simulated model) cannot be had, or None. Loads no weights."""
    # Imported here: a cheap module until the check runs.
    from transformers import AutoConfig

    from worker.simulated import is_simulated, spec_problem

    if is_simulated(source):
        return spec_problem(source)

    try:
        AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        return str(exc).splitlines()[0]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Check the model source given as the only argument; print the problem, if any, and exit 1 for one."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python -m worker.model_check SOURCE", file=sys.stderr)
        return 2
    problem = check_source(args[0])
    if problem is None:
        return 0
    print(problem, flush=True)
    return EXIT_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
