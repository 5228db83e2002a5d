"""Names of served models and where their weights come from. No torch here: the API uses it too."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import ConfigError

# Short names for the models the course uses; any Hugging Face id or local directory works as well.
ALIASES: dict[str, str] = {
    "flan-t5-small": "google/flan-t5-small",
    "flan-t5-base": "google/flan-t5-base",
    "flan-t5-large": "google/flan-t5-large",
    "flan-t5-xl": "google/flan-t5-xl",
    "phi-3-mini-4k": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3-mini-128k": "microsoft/Phi-3-mini-128k-instruct",
}

SIMULATED_PREFIX = "sim:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


@dataclass(frozen=True)
class ModelSpec:
    """A served model: the name clients use, and the source its weights load from."""

    name: str
    source: str

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """`alias`, `hf-org/id`, `/local/dir`, or `name=source`."""
        name, sep, source = text.partition("=")
        name, source = name.strip(), source.strip()
        if not sep:
            source = name
            # A local directory is served under its last path component, not its whole path.
            if name.startswith(("/", ".", "~")):
                name = name.rstrip("/").rsplit("/", 1)[-1]
            # A simulated model (`sim:NAME`, see worker/simulated.py) is served as `sim-NAME`: queue names keep no colon.
            elif name.startswith(SIMULATED_PREFIX):
                name = "sim-" + name[len(SIMULATED_PREFIX) :]
        if not _NAME.match(name):
            raise ConfigError(f"model name {name!r} must be 1-128 letters, digits or ._/- characters")
        if not source:
            raise ConfigError(f"model {name!r} has an empty source")
        return cls(name=name, source=ALIASES.get(source, source))

    def to_text(self) -> str:
        return f"{self.name}={self.source}"


def parse_model_spec(text: str) -> ModelSpec:
    """Parse one model setting (see `ModelSpec.parse`)."""
    return ModelSpec.parse(text)


def parse_model_list(text: str) -> tuple[ModelSpec, ...]:
    """Parse `alias=source,alias=source`."""
    return tuple(ModelSpec.parse(part) for part in text.split(",") if part.strip())

