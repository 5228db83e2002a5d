"""The spelling of the device settings, `RAGQ_DEVICE` and `RAGQ_MAX_MEMORY`. No torch here: every process (the
API too) validates its settings at start-up; the worker turns them into a placement (`worker/placement.py`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import ConfigError

DEVICE_SPELLINGS = "auto, cpu, cuda, cuda:N, mps, or GPUs one model spans such as cuda:0,cuda:1"
_GPU = re.compile(r"^cuda:(\d+)$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?$", re.IGNORECASE)
# Decimal and binary units, case-insensitive and always bytes (accelerate reads `Gb` as bits; we pass it bytes).
_UNITS = (
    {"b": 1}
    | {f"{p}b": 1000**i for i, p in enumerate("kmgt", 1)}
    | {f"{p}ib": 1024**i for i, p in enumerate("kmgt", 1)}
)


@dataclass(frozen=True)
class DeviceSetting:
    """`RAGQ_DEVICE` read: its kind (`auto`, `cpu`, `cuda` or `mps`) and, for `cuda`, the GPUs it names."""

    kind: str
    # Bare `cuda` is `cuda:0`, the first visible GPU (what torch's "current device" is in a worker process).
    gpus: tuple[int, ...] = ()

    @property
    def spans(self) -> bool:
        """True when one model is spread over several GPUs."""
        return len(self.gpus) > 1

    def allows(self, device: str) -> bool:
        """Whether `RAGQ_MAX_MEMORY` may give a budget to `device` (`cpu`, `mps` or `cuda:N`) under this setting."""
        if device == "cpu":
            return True
        if self.kind == "auto":
            return device != "mps"
        if self.kind == "mps":
            return device == "mps"
        return device in {f"cuda:{i}" for i in self.gpus}


def parse_device(text: str) -> DeviceSetting:
    """Read `RAGQ_DEVICE`; anything but the spellings in `DEVICE_SPELLINGS` is a `ConfigError`."""
    text = text.strip()
    if text in {"auto", "cpu", "mps"}:
        return DeviceSetting(text)
    if text == "cuda":
        return DeviceSetting("cuda", (0,))
    parts = [part.strip() for part in text.split(",")]
    matches = [_GPU.match(part) for part in parts]
    if not all(matches):
        bad = next(part for part, match in zip(parts, matches, strict=True) if not match)
        hint = "; a list names GPUs only (offload to the CPU is RAGQ_MAX_MEMORY's cpu=)" if len(parts) > 1 else ""
        raise ConfigError(f"{bad or text!r} is not a device: use {DEVICE_SPELLINGS}{hint}")
    gpus = tuple(int(m.group(1)) for m in matches if m)
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"{text!r} names a GPU twice")
    return DeviceSetting("cuda", gpus)


def parse_size(text: str) -> int:
    """Bytes in `20GiB`, `1.5GB`, `512MiB` or `1000000` (plain bytes)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ConfigError(f"{text!r} is not a size: use bytes or a number with B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    number, unit = match.groups()
    if unit is None and "." in number:
        raise ConfigError(f"{text!r}: a size without a unit is whole bytes")
    return int(float(number) * _UNITS[(unit or "b").lower()])


def parse_max_memory(text: str) -> dict[str, int]:
    """Read `RAGQ_MAX_MEMORY` (`cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB`) into bytes by device; empty text is no caps."""
    caps: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        device, sep, size = (piece.strip() for piece in item.partition("="))
        if not sep:
            raise ConfigError(f"{item!r} is not device=size (such as cuda:0=20GiB or cpu=64GiB)")
        if device not in {"cpu", "mps"} and not _GPU.match(device):
            raise ConfigError(f"{device!r} is not a device with a memory budget: use cuda:N, cpu or mps")
        if device in caps:
            raise ConfigError(f"{device} is given twice")
        caps[device] = parse_size(size)
    return caps


def check_placement_settings(device: str, max_memory: str | None) -> None:
    """Both device settings are well spelled, and every budget names a device `RAGQ_DEVICE` lets the model use."""
    try:
        setting = parse_device(device)
    except ConfigError as exc:
        raise ConfigError(f"RAGQ_DEVICE: {exc.message}") from None
    try:
        caps = parse_max_memory(max_memory or "")
    except ConfigError as exc:
        raise ConfigError(f"RAGQ_MAX_MEMORY: {exc.message}") from None
    for name in caps:
        if not setting.allows(name):
            raise ConfigError(f"RAGQ_MAX_MEMORY gives {name} a budget, but RAGQ_DEVICE={device} does not use it")
