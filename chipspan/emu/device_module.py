"""``torch.emu``: the module PyTorch looks up for the emu device.

PyTorch's generic code (``torch.get_device_module("emu")``, ``torch.manual_seed``,
``torch.autocast``, ``torch.load``, activation checkpointing) calls these functions by name.
Every op on emu finishes before it returns, so there is nothing to synchronize.
"""

import torch

_C = None  # the compiled backend, set by chipspan.emu.enable()


def name() -> str:
    """The device type of the chips: "emu", or the name a stand-in plugin gave them ("tpu")."""
    return torch._C._get_privateuse1_backend_name()


def _index(device=None) -> int:
    """A chip index from an int, "emu", "emu:3" or torch.device; None means the current chip."""
    if device is None:
        return current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != name():
        raise ValueError(f"expected an {name()} device, got {device}")
    return current_device() if device.index is None else device.index


# --- devices -------------------------------------------------------------------------


def is_available() -> bool:
    return _C is not None


def is_initialized() -> bool:
    return _C is not None


def init() -> None:
    pass


def _lazy_init() -> None:
    pass


def _is_in_bad_fork() -> bool:
    return False


def device_count() -> int:
    return _C.chip_count() if _C is not None else 0


def current_device() -> int:
    return _C.current_chip()


def set_device(device) -> None:
    _C.set_current_chip(_index(device))


def synchronize(device=None) -> None:
    pass


class device:
    """Context manager that makes a chip current: ``with torch.emu.device(2): ...``."""

    def __init__(self, device):
        self.index = -1 if device is None else _index(device)
        self.previous = -1

    def __enter__(self):
        self.previous = current_device()
        if self.index >= 0:
            set_device(self.index)

    def __exit__(self, *exc):
        set_device(self.previous)
        return False


# --- random numbers: one generator per chip ---------------------------------------------


def default_generator(device=None) -> torch.Generator:
    return _C.default_generator(_index(device))


def manual_seed(seed: int) -> None:
    default_generator().manual_seed(int(seed))


def manual_seed_all(seed: int) -> None:
    for chip in range(device_count()):
        default_generator(chip).manual_seed(int(seed))


def seed() -> None:
    default_generator().seed()


def seed_all() -> None:
    for chip in range(device_count()):
        default_generator(chip).seed()


def initial_seed() -> int:
    return default_generator().initial_seed()


def get_rng_state(device=None) -> torch.Tensor:
    return default_generator(device).get_state()


def set_rng_state(new_state: torch.Tensor, device=None) -> None:
    default_generator(device).set_state(new_state)


def get_rng_state_all() -> list[torch.Tensor]:
    return [get_rng_state(chip) for chip in range(device_count())]


def set_rng_state_all(new_states) -> None:
    for chip, state in enumerate(new_states):
        set_rng_state(state, chip)


# --- autocast ---------------------------------------------------------------------------


def get_amp_supported_dtype() -> list[torch.dtype]:
    return [torch.bfloat16, torch.float16]


# --- memory -----------------------------------------------------------------------------


def memory_allocated(device=None) -> int:
    return _C.memory(_index(device))[0]


def max_memory_allocated(device=None) -> int:
    return _C.memory(_index(device))[1]


def reset_peak_memory_stats(device=None) -> None:
    _C.reset_peak(_index(device))


def mem_get_info(device=None) -> tuple[int, int]:
    """(free, total) bytes: the chip's limit, or the host's memory when it has none."""
    return _C.memory_info(_index(device))


def empty_cache() -> None:
    pass
