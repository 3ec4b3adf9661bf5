"""Emulated accelerator chips: the ``emu`` device.

``enable(num_chips=4)`` makes ``emu:0`` … ``emu:3`` real PyTorch devices on any machine
with a C++ compiler. Tensors live in host memory and ops run on CPU kernels, but each chip
is its own device: an op that mixes two chips fails as on real hardware, each chip counts
its memory (and can be given a limit), and each has its own random generator. Use it to
test multi-chip code and to rehearse a placement before renting the chips. See docs/emu.md.
"""

import os
import threading

import torch

from chipspan.errors import ChipspanError

from . import _build, device_module, profiles

DEFAULT_CHIPS = 8
MAX_CHIPS = 64

_lock = threading.Lock()
_ext = None
_profile = profiles.PLAIN
NAME = "emu"  # the device type PyTorch knows the chips by


def is_available() -> bool:
    """Whether ``enable()`` can work in this process: already enabled, or buildable here."""
    if _ext is not None:
        return True
    return _privateuse1_owner() is None and _build.missing_tool() is None


def enable(
    num_chips: int | None = None,
    memory_limit_bytes: int | None = None,
    profile: str | None = None,
    device_type: str = NAME,
) -> None:
    """Make ``emu:0`` … ``emu:<num_chips-1>`` available, building the backend on first use.

    ``num_chips`` defaults to ``$CHIPSPAN_EMU_CHIPS``, else 8; ``profile`` (default
    ``$CHIPSPAN_EMU_PROFILE``, else "plain") names the chip they stand in for
    (``chipspan.emu.profiles``: e.g. "bm1684x" refuses int64 tensors); ``memory_limit_bytes``
    caps every chip (None: the profile's memory, no cap for "plain"). Calling again reconfigures
    all three; chips can be removed only while they hold no tensors. PyTorch allows one
    PrivateUse1 backend per process, so emu cannot share a process with another plugin such as
    torch_tpu.

    ``device_type`` names the chips for PyTorch, once per process: "emu" registers
    ``torch.emu``; another name (a stand-in for a vendor plugin, such as tests/plugins/torch_tpu
    for "tpu") leaves registering ``torch.<device_type>`` to the stand-in.
    """
    global _ext, _profile
    chosen = profiles.profile_named(profile or os.environ.get("CHIPSPAN_EMU_PROFILE") or profiles.PLAIN.name)
    if num_chips is None:
        try:
            num_chips = int(os.environ.get("CHIPSPAN_EMU_CHIPS") or DEFAULT_CHIPS)
        except ValueError:
            raise ChipspanError("CHIPSPAN_EMU_CHIPS must be a number of chips, such as 4") from None
    if not 1 <= num_chips <= MAX_CHIPS:
        raise ChipspanError(f"emu supports 1 to {MAX_CHIPS} chips, not {num_chips}")
    with _lock:
        if _ext is None:
            owner = _privateuse1_owner()
            if owner is not None:
                raise ChipspanError(
                    f"cannot enable emu: this process already uses the `{owner}` "
                    "device plugin (one per process); run emu in its own process"
                )
            _register(_build.load(), device_type)
        elif device_type != device_module.name():
            raise ChipspanError(
                f"emu is already enabled as '{device_module.name()}' in this process; "
                f"it cannot become '{device_type}' too (one name per process)"
            )
        try:
            _ext.set_chip_count(num_chips)
        except RuntimeError as e:
            raise ChipspanError(str(e).splitlines()[0]) from e
        _ext.set_refused_dtypes(list(chosen.refused_dtypes), chosen.name)
        _profile = chosen
        set_memory_limit(memory_limit_bytes if memory_limit_bytes is not None else chosen.memory_bytes)


def profile() -> profiles.Profile:
    """The chip the emulated chips stand in for now (``enable``'s profile; "plain" until enabled)."""
    return _profile


def peak_memory(chip) -> int:
    """Most bytes held at once on ``chip`` (an index, "emu:3" or torch.device) since the last reset."""
    return _enabled().memory(device_module._index(chip))[1]


def memory_allocated(chip) -> int:
    """Bytes now held by tensors on ``chip``."""
    return _enabled().memory(device_module._index(chip))[0]


def reset_peak_memory(chip=None) -> None:
    """Start peak counting afresh on ``chip``, or on every chip when None."""
    ext = _enabled()
    for index in range(ext.chip_count()) if chip is None else [device_module._index(chip)]:
        ext.reset_peak(index)


def set_memory_limit(limit_bytes: int | None, chip=None) -> None:
    """Cap ``chip`` (every chip when None) at ``limit_bytes``; None removes the cap.

    An allocation beyond the cap raises ``torch.OutOfMemoryError`` naming the chip, e.g.
    "emu:3 out of memory: tried to allocate 64.00 MiB with 13.95 GiB of its 14.00 GiB limit in use".
    """
    ext = _enabled()
    if limit_bytes is not None and limit_bytes < 0:
        raise ChipspanError(f"a chip memory limit must be at least 0 bytes, not {limit_bytes}")
    limit = -1 if limit_bytes is None else int(limit_bytes)
    for index in range(MAX_CHIPS) if chip is None else [device_module._index(chip)]:
        ext.set_limit(index, limit)


def _enabled():
    if _ext is None:
        raise ChipspanError("the emu device is not enabled: call chipspan.emu.enable() first")
    return _ext


def _privateuse1_owner() -> str | None:
    """The name another plugin gave PrivateUse1, if one did."""
    name = torch._C._get_privateuse1_backend_name()
    return None if name == "privateuseone" else name


def _register(ext, device_type: str) -> None:
    global _ext
    device_module._C = ext
    torch.utils.rename_privateuse1_backend(device_type)
    if device_type == NAME:
        torch._register_device_module(device_type, device_module)
    torch.utils.generate_methods_for_privateuse1_backend(for_storage=True)
    _ext = ext
    # PyTorch's autograd engine sizes its per-device worker threads once per process, at
    # the first backward, so chips added later (or emu enabled after a CPU backward) would
    # have none. Run backward passes in the calling thread instead, as on CPU.
    torch.autograd.set_multithreading_enabled(False)
