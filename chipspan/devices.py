"""Devices and chips: which device type, which chips, and the quirks of each, in one place.

A device type is a string: ``cpu``, ``cuda``, ``tpu`` (Sophgo, through ``torch_tpu``), ``npu``
(Ascend, ``torch_npu``), ``xpu``, ``mps``, ``emu`` (chipspan's emulated chips) or any other
PrivateUse1 name. Vendor plugins are imported only when their device type is asked for. On a type
with one device (``cpu``), any number of chips maps onto it: the same spanning code runs, so it can
be tested anywhere.
"""

from __future__ import annotations

import importlib
import re

import torch

from chipspan.errors import ChipspanError

# Device types whose PyTorch support lives in a separate plugin package.
PLUGINS = {"tpu": "torch_tpu", "npu": "torch_npu"}
# Device types that have a single device however many chips are asked for.
SINGLE_DEVICE_TYPES = ("cpu", "mps")
MAX_CHIPS = 1 << 16  # chips one job may name: far more than any model has layers to span
# What a device type's plugin cannot hold (torch-tpu lists these as unsupported); emu's come from its profile.
REFUSED_DTYPES = {
    "tpu": (torch.int64, torch.quint8, torch.quint4x2, torch.quint2x4, torch.qint32, torch.qint8),
}


def default_device_type() -> str:
    """The accelerator PyTorch reports, else cpu. Emulated chips are used only when asked for."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        kind = accelerator.current_accelerator().type
        if kind != "emu":
            return kind
    return "cpu"


def prepare_device_type(device_type: str, chips_wanted: int = 1, emu_memory_limit: int | None = None) -> None:
    """Import the plugin a device type needs, or start ``chips_wanted`` emulated chips with an
    optional per-chip memory limit (bytes); one clear line if it is missing."""
    if device_type == "emu":
        from chipspan import emu

        emu.enable(num_chips=chips_wanted, memory_limit_bytes=emu_memory_limit)
        return
    plugin = PLUGINS.get(device_type)
    if plugin is None:
        return
    try:
        importlib.import_module(plugin)
    except ImportError as exc:
        raise ChipspanError(
            f"device '{device_type}' needs the PyTorch plugin '{plugin}', which cannot be "
            f"imported ({exc}); install your vendor's {plugin} package"
        ) from None


def device_count(device_type: str) -> int:
    """How many devices of this type the process sees (single-device types report 1)."""
    if device_type in SINGLE_DEVICE_TYPES:
        return 1
    try:
        return torch.get_device_module(device_type).device_count()
    except (AttributeError, RuntimeError) as exc:
        raise ChipspanError(f"device type '{device_type}' is not available in this PyTorch ({exc})") from None


def parse_chip_ids(spec: str | None) -> list[int]:
    """Chip ids from "0-3", "0,1,2,3", "2" (one chip) or None (chip 0); contiguous, as LLaMA-Factory 0.5 required."""
    if spec is None or str(spec).strip() == "":
        return [0]
    spec = str(spec).strip()
    match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", spec)
    if match:
        first, last = int(match.group(1)), int(match.group(2))
        if last - first >= MAX_CHIPS:
            raise ChipspanError(f"chips '{spec}' names {last - first + 1} chips; chipspan spans at most {MAX_CHIPS}")
        ids = list(range(first, last + 1))
    elif re.fullmatch(r"\d+(\s*,\s*\d+)*", spec):
        ids = [int(part) for part in spec.split(",")]
    else:
        raise ChipspanError(f"cannot read chips '{spec}'; write a range like 0-3 or a list like 0,1,2,3")
    if not ids:
        raise ChipspanError(f"chips '{spec}' names no chip; write a range like 0-3")
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise ChipspanError(f"chips '{spec}' are not contiguous and ascending; write them like 2-5")
    return ids


def chip_devices(device_type: str, chip_ids: list[int]) -> list[torch.device]:
    """One torch.device per chip; checks the chips exist. Single-device types map every chip to it."""
    if device_type in SINGLE_DEVICE_TYPES:
        return [torch.device(device_type)] * len(chip_ids)
    available = device_count(device_type)
    beyond = [i for i in chip_ids if i >= available]
    if beyond:
        raise ChipspanError(
            f"chip {beyond[0]} does not exist: this machine shows {available} '{device_type}' "
            f"device(s), ids 0-{available - 1}; lower CHIPS/SOPHGO_SPLIT or --chips"
        )
    return [torch.device(device_type, i) for i in chip_ids]


def memory_stats(device: torch.device) -> dict[str, int] | None:
    """Allocated and peak bytes on one device, or None where the device reports nothing (cpu)."""
    if device.type in SINGLE_DEVICE_TYPES:
        return None
    module = torch.get_device_module(device.type)
    try:
        return {"allocated": module.memory_allocated(device), "peak": module.max_memory_allocated(device)}
    except (AttributeError, RuntimeError):
        return None


def refused_dtypes(device_type: str) -> tuple[torch.dtype, ...]:
    """The dtypes no tensor on a chip of ``device_type`` may have (emu: its profile's)."""
    if device_type == "emu":
        from chipspan import emu

        return emu.profile().refused_dtypes
    return REFUSED_DTYPES.get(device_type, ())


def index_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of token ids, positions and gather indices on ``device``: int64, or int32 where
    the chip cannot hold int64."""
    return torch.int32 if torch.int64 in refused_dtypes(torch.device(device).type) else torch.int64


def supports_half_compute(device_type: str) -> bool:
    """Whether fp16/bf16 arithmetic is worth using here; CPUs compute it slowly or in emulation."""
    return device_type not in ("cpu",)
