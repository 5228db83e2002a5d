"""A cheap check that a model can be had, before any process loads its weights."""

from __future__ import annotations

from shared.models import ModelSpec


def check_model(spec: ModelSpec) -> str | None:
    """Why `spec`'s model cannot be had (its config cannot be read), or None. Loads no weights."""
    from transformers import AutoConfig  # imported here: a cheap module until the check runs

    try:
        AutoConfig.from_pretrained(spec.source)
    except (OSError, ValueError) as exc:
        return str(exc).splitlines()[0]
    return None
