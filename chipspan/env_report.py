"""``chipspan env``: what to send with a bug report — versions, the devices and their memory, and
the environment variables that steer chips — as text or JSON. Nothing here loads a model; a device
that cannot be asked is reported with the reason, never raised."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import sys

import torch

from chipspan import __version__, devices
from chipspan.args import environment_device
from chipspan.errors import ChipspanError

# Packages whose versions decide how a run behaves (chipspan's own needs, the vendor plugins, the
# test references).
PACKAGES = ("torch", "torch-tpu", "torch-npu", "safetensors", "tokenizers", "numpy", "transformers", "peft")
# Variables that choose chips or change how a plugin or PyTorch runs.
VARIABLE_PREFIXES = ("USE_SOPHGO", "SOPHGO_", "CHIPS", "CHIP_", "TPU_", "CHIPSPAN_", "ASCEND_", "CUDA_", "HIP_")
VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
GIB = 1 << 30


def collect(device_type: str | None = None) -> dict:
    """The report as a dict: ``device_type`` (default: tpu under USE_SOPHGO=1, else the accelerator
    PyTorch reports, else cpu) is the device asked about; its plugin is imported to count the chips."""
    kind = device_type or environment_device(os.environ) or devices.default_device_type()
    chips = _chips(kind)  # imports the plugin, so _plugin_file can say where from
    return {
        "chipspan": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_build": _torch_build(),
        "packages": {name: _version(name) for name in PACKAGES},
        "plugin_notes": _plugin_notes(),
        "device_type": kind,
        "chips": chips,
        "plugin": _plugin_file(kind),
        "variables": {k: v for k, v in sorted(os.environ.items()) if k in VARIABLES or k.startswith(VARIABLE_PREFIXES)},
    }


def render(report: dict) -> str:
    """The report as ``key: value`` lines, one chip a line."""
    lines = [f"chipspan {report['chipspan']}, Python {report['python']}, {report['platform']}"]
    lines.append(f"cpu: {report['cpu_cores']} cores, torch uses {report['torch_threads']} threads")
    lines.append(f"torch build: {report['torch_build']}")
    lines += [f"{name}: {version or 'not installed'}" for name, version in report["packages"].items()]
    lines += [f"note: {note}" for note in report["plugin_notes"]]
    if report["plugin"]:
        lines.append(f"plugin: {report['plugin']}")
    chips = report["chips"]
    if isinstance(chips, str):
        lines.append(f"device {report['device_type']}: {chips}")
    else:
        lines.append(f"device {report['device_type']}: {len(chips)} chip(s)")
        lines += [f"  {chip['device']}: {_memory_text(chip)}" for chip in chips]
    lines += [f"{name}={value}" for name, value in report["variables"].items()] or ["(no chip variables set)"]
    return "\n".join(lines)


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_build() -> str:
    accelerators = [f"CUDA {torch.version.cuda}" if torch.version.cuda else None]
    accelerators.append(f"ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else None)
    return ", ".join(a for a in accelerators if a) or "CPU only"


def _plugin_notes() -> list[str]:
    """Warnings about the vendor plugins installed: PyPI's ``torch-tpu`` is Google's TPU plugin, not
    Sophgo's, though both import as ``torch_tpu``."""
    try:
        meta = importlib.metadata.metadata("torch-tpu")
    except importlib.metadata.PackageNotFoundError:
        return []
    home = " ".join(filter(None, [meta.get("Home-page"), *meta.get_all("Project-URL", [])]))
    if "google" in home.lower():
        return [
            f"the installed torch-tpu {meta['Version']} is Google's TPU plugin ({meta.get('Home-page')}), "
            "not Sophgo's: Sophgo cards need the torch-tpu wheel from Sophgo's SDK (docs/sophgo.md)"
        ]
    return []


def _plugin_file(device_type: str) -> str | None:
    """Where the plugin of ``device_type`` was imported from (once ``_chips`` tried), if it was."""
    module = sys.modules.get(devices.PLUGINS.get(device_type, ""))
    return getattr(module, "__file__", None)


def _chips(device_type: str) -> list[dict] | str:
    """Each chip of ``device_type`` with its memory, or why they cannot be listed."""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torch-tpu prints which chip it found as it imports
            devices.prepare_device_type(device_type)
        count = devices.device_count(device_type)
        chips = devices.chip_devices(device_type, list(range(count)))
    except (ChipspanError, ImportError, RuntimeError, OSError) as exc:
        return f"not available ({' '.join(str(exc).split())})"
    return [{"device": str(chip), **_memory(chip)} for chip in chips]


def _memory(chip: torch.device) -> dict:
    """Free and total bytes of one chip as it reports them, or a note saying why there are none."""
    if chip.type in devices.SINGLE_DEVICE_TYPES:
        return {"note": "host memory"}
    try:
        free, total = torch.get_device_module(chip.type).mem_get_info(chip)
    except (AttributeError, RuntimeError, TypeError) as exc:
        return {"note": f"memory not reported ({type(exc).__name__})"}
    return {"free_bytes": int(free), "total_bytes": int(total)}


def _memory_text(memory: dict) -> str:
    if "note" in memory:
        return memory["note"]
    return f"{memory['free_bytes'] / GIB:.2f} GiB free of {memory['total_bytes'] / GIB:.2f} GiB"
