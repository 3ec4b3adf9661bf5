"""Generation over a model spanned across chips: the stages run one after another, sharing one KV cache."""

from __future__ import annotations

import torch
from torch import nn

from chipspan.chips.span import SpannedModel
from chipspan.models.decoder import CausalLMOutput, KVCache, build_attention_mask, default_position_ids


class SpannedDecoder(nn.Module):
    """A ``SpannedModel`` in the role of a ``CausalLM`` for :func:`chipspan.infer.generate.generate`.

    The KV cache is keyed by global layer index, so one cache serves every stage. Only unpadded,
    single-sequence decoding (batch 1) is needed there.
    """

    def __init__(self, spanned: SpannedModel):
        super().__init__()
        self.stages = nn.ModuleList(spanned.stages)  # the first chip's parameters come first
        self.devices = list(spanned.placement.devices)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> CausalLMOutput:
        """input_ids (1, s) -> logits (1, s, vocab) on the last chip."""
        s = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        hidden = self.stages[0].embed(input_ids.to(self.devices[0]))
        for stage, device in zip(self.stages, self.devices):
            hidden = hidden.to(device)
            positions = default_position_ids(None, 1, s, past, device)
            hidden = stage.run_layers(hidden, positions, build_attention_mask(None, s, past, device), cache)
        return CausalLMOutput(logits=self.stages[-1].logits(hidden), loss=None)
