"""``torch_tpu.tpu`` (also ``torch.tpu``): the functions of Sophgo's device module that PyTorch and
chipspan call, served by the emulated chips."""

from chipspan.emu.device_module import (  # noqa: F401  (the plugin's names, re-exported)
    _is_in_bad_fork,
    _lazy_init,
    current_device,
    default_generator,
    device,
    device_count,
    empty_cache,
    get_amp_supported_dtype,
    get_rng_state,
    get_rng_state_all,
    init,
    initial_seed,
    is_available,
    is_initialized,
    manual_seed,
    manual_seed_all,
    max_memory_allocated,
    mem_get_info,
    memory_allocated,
    reset_peak_memory_stats,
    seed,
    seed_all,
    set_device,
    set_rng_state,
    set_rng_state_all,
    synchronize,
)

from . import amp  # noqa: F401


def get_device_name(device=None) -> str:  # noqa: F811  (the plugin's parameter name)
    return "BM1684X (emulated)"


def memory_stats(device=None) -> dict[str, int]:  # noqa: F811
    """The two counters of the plugin's statistics that an emulated chip keeps (bytes)."""
    return {
        "allocated_bytes.all.current": memory_allocated(device),
        "allocated_bytes.all.peak": max_memory_allocated(device),
    }
