"""Where a model's weights go: one device, or spread by accelerate over several GPUs, the CPU and disk.

Every load goes through `from_pretrained(..., device_map=...)`, so weights are read straight onto their device
instead of onto the CPU and then copied (`.to(device)`), and a model larger than one GPU is cut into whole
blocks (`_no_split_modules`) placed GPU by GPU, then in CPU memory, then on disk; accelerate's hooks move each
block's inputs to it in the forward pass. See docs/design.md, "Placement".
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # accelerate depends on it, and measures free CPU memory with it as we do
import torch
from transformers import PreTrainedModel

from shared.devices import DeviceSetting, parse_device, parse_max_memory
from shared.errors import ConfigError

# Where accelerate keeps what it offloads: plain memory for `cpu`, the checkpoint file (or a copy) for `disk`.
OFFLOADED = ("cpu", "disk")


@dataclass(frozen=True)
class Placement:
    """Where one model goes, decided from the settings and the machine before any weight is read."""

    # `{"": "cuda:0"}` puts the whole model on one device; `"auto"` lets accelerate spread it within `max_memory`.
    device_map: str | dict[str, str]
    # accelerate's keys (a GPU's index, "mps", "cpu") to bytes; None lets accelerate measure every device.
    max_memory: dict[int | str, int] | None
    dtype: torch.dtype
    # Only used when something lands on disk; one folder per process, so two workers never write the same files.
    offload_folder: Path | None
    # The device a setting stands for (a list's first GPU); after loading, inputs go to `input_device(model)`.
    primary: torch.device

    @property
    def spread(self) -> bool:
        """True when accelerate decides the split (several devices, or a budget that may not hold the model)."""
        return isinstance(self.device_map, str)

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `from_pretrained` for this placement.

        transformers 5 always builds the model on the meta device and reads each weight onto its target, so there is
        no `low_cpu_mem_usage` to pass (it is ignored); `device_map` alone decides where weights land.
        """
        kwargs: dict[str, Any] = {"dtype": self.dtype, "device_map": self.device_map}
        if self.max_memory is not None:
            kwargs["max_memory"] = self.max_memory
        if self.spread and self.offload_folder is not None:
            kwargs["offload_folder"] = str(self.offload_folder)
        return kwargs


def primary_device(device: str) -> torch.device:
    """The device a setting stands for: `auto` is the first GPU when there is one, else the CPU; a list, its first GPU."""
    setting = parse_device(device)
    if setting.kind == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if setting.kind == "cuda":
        return torch.device("cuda", setting.gpus[0])
    return torch.device(setting.kind)


def plan_placement(
    device: str, dtype: torch.dtype, max_memory: str | None = None, offload_dir: Path | None = None
) -> Placement:
    """The placement for settings `RAGQ_DEVICE=device` and `RAGQ_MAX_MEMORY=max_memory` on this machine."""
    setting = parse_device(device)
    caps = parse_max_memory(max_memory or "")
    gpus = _gpus(setting)
    kind = ("cuda" if gpus else "cpu") if setting.kind == "auto" else setting.kind
    primary = primary_device(device)
    for name in caps:
        if name.startswith("cuda:") and int(name[5:]) not in gpus:
            raise ConfigError(f"RAGQ_MAX_MEMORY gives {name} a budget, but this process sees GPUs {list(gpus)}")
    folder = offload_dir / f"pid-{os.getpid()}" if offload_dir is not None else None
    if len(gpus) <= 1 and not caps:
        # One device and no budget: the whole model there, no hooks, exactly as a plain load and `.to(device)`.
        return Placement({"": str(primary)}, None, dtype, None, primary)
    if setting.kind == "auto" and not caps:
        # Several GPUs and no budget: accelerate measures them all and the CPU, and balances the blocks over the GPUs.
        return Placement("auto", None, dtype, folder, primary)
    return Placement("auto", _budgets(kind, gpus, caps), dtype, folder, primary)


def _gpus(setting: DeviceSetting) -> tuple[int, ...]:
    """The GPUs a setting uses, each checked to exist (`CUDA_VISIBLE_DEVICES` counts)."""
    count = torch.cuda.device_count() if setting.kind in ("auto", "cuda") else 0
    if setting.kind == "auto":
        return tuple(range(count))
    missing = [i for i in setting.gpus if i >= count]
    if missing:
        raise ConfigError(f"RAGQ_DEVICE names cuda:{missing[0]}, but this process sees {count} GPU(s)")
    return setting.gpus


def _budgets(kind: str, gpus: tuple[int, ...], caps: dict[str, int]) -> dict[int | str, int]:
    """accelerate's `max_memory` for the devices this placement may use: the configured caps, and for a device
    without one what accelerate itself would measure (free memory). Listing only these devices is what keeps
    accelerate off the GPUs the setting leaves out."""
    budgets: dict[int | str, int] = {}
    for i in gpus:
        key = f"cuda:{i}"
        budgets[i] = caps[key] if key in caps else int(torch.cuda.mem_get_info(i)[0])
    if kind == "mps":
        budgets["mps"] = caps.get("mps", psutil.virtual_memory().available)
        # MPS shares the host's memory: a CPU budget too would count it twice (accelerate's own rule), unless set.
        if "cpu" in caps:
            budgets["cpu"] = caps["cpu"]
        return budgets
    budgets["cpu"] = caps.get("cpu", psutil.virtual_memory().available)
    return budgets


def input_device(model: PreTrainedModel) -> torch.device:
    """Where `generate`'s inputs go: the input embeddings' device when accelerate spread the model, else its device.

    An offloaded block (`cpu`, `disk`) runs on accelerate's main device: a device of the map that is neither,
    chosen as `accelerate.dispatch_model` chooses it, or the CPU when there is none.
    """
    device_map: dict[str, Any] | None = getattr(model, "hf_device_map", None)
    if not device_map:
        return model.device
    embeddings = model.get_input_embeddings()
    name = next((n for n, module in model.named_modules() if module is embeddings), "")
    placed = _device_of(name, device_map)
    if placed in OFFLOADED:
        on_devices = list(set(device_map.values()) - set(OFFLOADED))
        placed = _device_name(on_devices[0]) if on_devices else "cpu"
    return torch.device(placed)


@dataclass(frozen=True)
class DeviceShare:
    """What one device holds: entries of the device map, parameters (elements) and bytes (parameters and buffers)."""

    modules: int
    parameters: int
    bytes: int


@dataclass(frozen=True)
class PlacementReport:
    """Where each part of a loaded model went, and how long loading took; published as `to_dict()`."""

    devices: dict[str, DeviceShare]
    input_device: str
    load_s: float
    spread: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return {
            "devices": {name: vars(share) for name, share in self.devices.items()},
            "input_device": self.input_device,
            "load_s": round(self.load_s, 3),
            "spread": self.spread,
        }

    def summary(self) -> str:
        """One line for the start-up log: `cuda:0 5.31 GiB (1 module, 2.85B params); inputs on cuda:0; loaded in 9.20 s`."""
        shares = ", ".join(
            f"{name} {_gib(share.bytes)} ({share.modules} module{'s' * (share.modules != 1)}, "
            f"{_count(share.parameters)} params)"
            for name, share in self.devices.items()
        )
        return f"{shares}; inputs on {self.input_device}; loaded in {self.load_s:.2f} s"


def report_placement(model: PreTrainedModel, load_s: float) -> PlacementReport:
    """Where `model`'s weights are, from accelerate's device map when it spread the model, else from the tensors."""
    device_map: dict[str, Any] | None = getattr(model, "hf_device_map", None)
    modules: dict[str, int] = {}
    parameters: dict[str, int] = {}
    sizes: dict[str, int] = {}
    tensors = [(n, t, True) for n, t in model.named_parameters()] + [(n, t, False) for n, t in model.named_buffers()]
    for name, tensor, is_parameter in tensors:
        # Offloaded tensors sit on the meta device; the map says where they really are.
        device = _device_of(name, device_map) if device_map else str(tensor.device)
        if is_parameter:
            parameters[device] = parameters.get(device, 0) + tensor.numel()
        sizes[device] = sizes.get(device, 0) + tensor.numel() * tensor.element_size()
    if device_map:
        for placed in device_map.values():
            modules[_device_name(placed)] = modules.get(_device_name(placed), 0) + 1
    else:
        modules = dict.fromkeys(sizes, 1)
    order = sorted(sizes, key=_rank)
    devices = {d: DeviceShare(modules.get(d, 0), parameters.get(d, 0), sizes[d]) for d in order}
    return PlacementReport(devices, str(input_device(model)), load_s, bool(device_map))


def load_placed(auto_class: Any, source: str, placement: Placement) -> tuple[PreTrainedModel, PlacementReport]:
    """`auto_class.from_pretrained(source)` onto `placement`, and the report of where it went."""
    started = time.monotonic()
    model = auto_class.from_pretrained(source, **placement.from_pretrained_kwargs())
    return model, report_placement(model, time.monotonic() - started)


def _device_of(name: str, device_map: dict[str, Any]) -> str:
    """The device the map gives tensor or module `name`: its longest key that is `name` or a prefix of it."""
    best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    return _device_name(device_map[best]) if best is not None else "cpu"


def _device_name(placed: Any) -> str:
    """accelerate writes GPUs as indices; everything else as text or `torch.device`."""
    return f"cuda:{placed}" if isinstance(placed, int) else str(placed)


def _rank(device: str) -> tuple[int, int, str]:
    """Report order: accelerators by index, then the CPU, then disk."""
    kind, _, index = device.partition(":")
    return (OFFLOADED.index(kind) + 1 if kind in OFFLOADED else 0, int(index) if index.isdigit() else 0, kind)


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**9 else f"{n / 1e6:.1f}M" if n >= 10**6 else f"{n / 1e3:.0f}K"
