"""One model spanned over several chips in one process.

Each chip holds a ``CausalLM`` slice (see ``placement``). A batch enters on the first chip; the
hidden states cross to the next chip's device at each boundary (the only place a tensor changes
chip); the loss is computed on the last chip. Autograd carries gradients back across the same
boundaries. ``place_inputs``, ``stage_forward`` and ``loss`` are the pieces of that forward, which
``chipspan.chips.pipeline`` interleaves over micro-batches.

Tied embeddings spanned over several chips live twice — the embedding matrix on the first chip,
its copy as the head on the last (``chipspan.chips.gradients`` keeps the two equal).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from chipspan.chips.placement import Placement
from chipspan.devices import index_dtype
from chipspan.models.decoder import CausalLM, build_attention_mask, default_position_ids
from chipspan.models.loss import ScoredTokens
from chipspan.models.weights import load_pretrained
from chipspan.quant import QuantSettings


class SpannedModel(nn.Module):
    def __init__(self, stages: list[CausalLM], placement: Placement):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.placement = placement
        self.config = stages[0].config

    @classmethod
    def load(
        cls, path: str | Path, placement: Placement, dtype: torch.dtype, quant: QuantSettings | None = None
    ) -> SpannedModel:
        """Read each chip's slice of the model folder's weights straight onto that chip (the decoder
        layers' linear weights quantized there as they arrive, with ``quant``)."""
        last = placement.num_chips - 1
        stages = [
            load_pretrained(path, dtype=dtype, device=device, layers=layers, embed=i == 0, head=i == last, quant=quant)
            for i, (device, layers) in enumerate(zip(placement.devices, placement.layers))
        ]
        return cls(stages, placement)

    @property
    def first(self) -> CausalLM:
        return self.stages[0]

    @property
    def last(self) -> CausalLM:
        return self.stages[-1]

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean next-token loss (fp32 scalar, on the last chip) of input_ids/labels (b, s).

        ``attention_mask`` (b, s): 0 = padding, 1 = real token, or the segment ids of packed
        examples; every stage gets the same attention mask and positions, on its own chip.
        """
        carried = self.place_inputs(input_ids, attention_mask)
        for i in range(len(self.stages)):
            carried = self.stage_forward(i, *carried)
        return self.loss(carried[0], labels)

    # -- the pieces of a forward, for pipelining (chipspan.chips.pipeline) --

    def place_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Token ids (b, s), positions (b, s) and the attention mask (bool (b, 1, s, s), or None for
        plain causal), all on the first chip: what ``stage_forward(0, ...)`` takes. Ids and positions
        travel in the chip's index dtype (int32 where it cannot hold int64); all three are made from
        the host's tensors on the host."""
        b, s = input_ids.shape
        device = self.placement.devices[0]
        index = index_dtype(device)
        positions = default_position_ids(attention_mask, b, s, 0, device)
        mask = build_attention_mask(attention_mask, s, 0)
        return input_ids.to(device, index), positions, mask.to(device) if mask is not None else None

    def stage_forward(
        self, i: int, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stage ``i`` on its chip: ``x`` is the token ids (b, s) for stage 0, which embeds them, else
        stage i - 1's hidden states (b, s, hidden). Inputs on another chip cross to this one first
        (the chip boundary). Returns (hidden states, positions, mask), all on stage i's chip."""
        device = self.placement.devices[i]
        if x.device != device:
            x, positions = x.to(device), positions.to(device)
            mask = mask.to(device) if mask is not None else None
        hidden = self.stages[i].embed(x) if i == 0 else x
        return self.stages[i].run_layers(hidden, positions, mask), positions, mask

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor | ScoredTokens, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy (fp32 scalar, "mean" or "sum" over labels != -100) of the last
        stage's hidden states (b, s, hidden) against labels (b, s) or their ``ScoredTokens``, on
        the last chip."""
        return self.last.loss(hidden, labels, reduction=reduction)

    def unique_parameters(self) -> list[nn.Parameter]:
        """Every parameter once: the head copy of embeddings tied across chips left out."""
        spanned_tie = self.config.tie_word_embeddings and len(self.stages) > 1
        skip = {id(self.last.lm_head.weight)} if spanned_tie else set()
        return [p for p in self.parameters() if id(p) not in skip]
