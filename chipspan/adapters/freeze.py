"""What ``--finetuning_type freeze`` trains: the last (or first) few decoder layers, and which of
their modules, from ``num_layer_trainable`` and ``name_module_trainable``.

Both the memory plan and ``train`` read the selection from here, so they price and train the same
parameters.
"""

from __future__ import annotations

from chipspan.args import FREEZE_MODULES
from chipspan.errors import ChipspanError


def freeze_layers(num_layers: int, count: int) -> range:
    """Layers "freeze" trains: the last ``count``, or the first ``-count`` when negative."""
    if count == 0 or abs(count) > num_layers:
        raise ChipspanError(
            f"num_layer_trainable must be between 1 and {num_layers} (or -1 to -{num_layers} "
            f"for the first layers), not {count}"
        )
    return range(num_layers - count, num_layers) if count > 0 else range(-count)


def freeze_modules(names: str) -> list[str]:
    """The decoder-layer modules "freeze" trains, from ``name_module_trainable`` (comma list, or all)."""
    modules = [n.strip() for n in names.split(",") if n.strip()]
    modules = list(FREEZE_MODULES.words) if modules == ["all"] else modules
    unknown = [m for m in modules if m not in FREEZE_MODULES.words] or ([] if modules else [names])
    if unknown:
        raise ChipspanError(
            f"name_module_trainable '{unknown[0]}' is not a module of a decoder layer; "
            f"choose from: {', '.join(FREEZE_MODULES.words)} (comma-separated), or all"
        )
    return modules
