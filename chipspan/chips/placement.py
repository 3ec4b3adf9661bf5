"""Which chip holds which part of the model.

The model is a chain of stages: the first holds the embeddings, the last the final norm, head and
loss, and every stage a contiguous run of decoder layers. Any number of chips from 1 to the number
of layers works; there is no silent fallback to one chip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig


@dataclass(frozen=True)
class Placement:
    devices: tuple[torch.device, ...]  # one per chip, in pipeline order
    layers: tuple[range, ...]  # decoder layers per chip

    @property
    def num_chips(self) -> int:
        return len(self.devices)

    def parameters_per_chip(self, config: ModelConfig) -> list[int]:
        """Parameter count each chip holds (a tied head counted on both ends when they differ)."""
        per_layer = config.parameters_per_layer
        embed = config.vocab_size * config.hidden_size
        counts = [len(r) * per_layer for r in self.layers]
        counts[0] += embed
        counts[-1] += config.hidden_size + (embed if self.num_chips > 1 or not config.tie_word_embeddings else 0)
        return counts

    def describe(self, config: ModelConfig) -> list[str]:
        """One line per chip: device, layers, what else it holds, parameters."""
        lines = []
        for i, (device, layers, params) in enumerate(zip(self.devices, self.layers, self.parameters_per_chip(config))):
            extras = (["embeddings"] if i == 0 else []) + (["norm+head+loss"] if i == self.num_chips - 1 else [])
            span = f"layers {layers.start}-{layers.stop - 1}" if len(layers) > 1 else f"layer {layers.start}"
            lines.append(
                f"chip {i} ({device}): {span}"
                + (f" + {', '.join(extras)}" if extras else "")
                + f", {params / 1e6:.1f}M parameters"
            )
        return lines


def split_layers(num_layers: int, num_chips: int) -> tuple[range, ...]:
    """Contiguous slices as equal as possible; when uneven, the last chips (which also hold the
    head and the logits) get the smaller share."""
    if num_chips < 1:
        raise ChipspanError("at least one chip is needed")
    if num_chips > num_layers:
        raise ChipspanError(
            f"cannot span {num_layers} decoder layers over {num_chips} chips: each chip needs "
            f"at least one layer; use at most {num_layers} chips"
        )
    base, extra = divmod(num_layers, num_chips)
    sizes = [base + (1 if i < extra else 0) for i in range(num_chips)]
    starts = [sum(sizes[:i]) for i in range(num_chips)]
    return tuple(range(start, start + size) for start, size in zip(starts, sizes))


def even_placement(config: ModelConfig, devices: list[torch.device]) -> Placement:
    return Placement(devices=tuple(devices), layers=split_layers(config.num_hidden_layers, len(devices)))
