"""One model spanned over several chips in one process.

Each chip holds a ``CausalLM`` slice (see ``placement``). A batch enters on the first chip; the
hidden states cross to the next chip's device at each boundary (the only place a tensor changes
chip); the loss is computed on the last chip. Autograd carries gradients back across the same
boundaries. ``place_inputs``, ``stage_forward`` and ``loss`` are the pieces of that forward, which
``chipspan.chips.pipeline`` interleaves over micro-batches.

Tied embeddings spanned over several chips live twice — the embedding matrix on the first chip,
its copy as the head on the last. Their gradients are summed into both before the optimizer step,
and the global gradient norm counts the matrix once, so both copies stay equal and the update is
the one a single device would make.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from chipspan.chips.placement import Placement
from chipspan.models.checkpoint import load_pretrained
from chipspan.models.decoder import CausalLM, build_attention_mask, default_position_ids
from chipspan.models.loss import ScoredTokens


class SpannedModel(nn.Module):
    def __init__(self, stages: list[CausalLM], placement: Placement):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.placement = placement
        self.config = stages[0].config

    @classmethod
    def load(cls, path: str | Path, placement: Placement, dtype: torch.dtype) -> SpannedModel:
        """Read each chip's slice of the checkpoint straight onto that chip."""
        last = placement.num_chips - 1
        stages = [
            load_pretrained(path, dtype=dtype, device=device, layers=layers, embed=i == 0, head=i == last)
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
        plain causal), all on the first chip: what ``stage_forward(0, ...)`` takes."""
        b, s = input_ids.shape
        device = self.placement.devices[0]
        positions = default_position_ids(attention_mask, b, s, 0, device).to(device)  # from the host mask
        mask = build_attention_mask(attention_mask.to(device) if attention_mask is not None else None, s, 0, device)
        return input_ids.to(device), positions, mask

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
        return self.last.loss(hidden, labels.to(hidden.device), reduction=reduction)

    def tied_copies(self) -> tuple[nn.Parameter, nn.Parameter] | None:
        """(embedding, head copy) when tied embeddings live on two different stages."""
        if not self.config.tie_word_embeddings or len(self.stages) == 1:
            return None
        return self.first.model.embed_tokens.weight, self.last.lm_head.weight

    def unique_parameters(self) -> list[nn.Parameter]:
        """Every parameter once: the head copy of tied embeddings left out."""
        copies = self.tied_copies()
        skip = {id(copies[1])} if copies else set()
        return [p for p in self.parameters() if id(p) not in skip]

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Sum tied gradients, clip the global gradient norm over all chips, return the norm before clipping."""
        copies = self.tied_copies()
        if copies and copies[0].requires_grad:
            embed, head = copies
            if head.grad is not None:
                embed.grad = (
                    head.grad.to(embed.device) if embed.grad is None else embed.grad + head.grad.to(embed.device)
                )
        norm = clip_global_norm([p for p in self.unique_parameters() if p.grad is not None], max_norm)
        if copies and copies[0].requires_grad and copies[0].grad is not None:
            copies[1].grad = copies[0].grad.to(copies[1].device)
        return norm


def clip_global_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients in place so their global L2 norm is at most ``max_norm`` (0: only measure);
    returns the norm before scaling, an fp32 scalar.

    The norm is the same however the parameters are spread over chips: one fp32 norm per
    parameter, on its own chip, then gathered in parameter order on the first chip. (Summing per
    device first, as ``torch.nn.utils.clip_grad_norm_`` does, rounds differently for each placement.)
    """
    grads = [p.grad for p in parameters]
    if not grads:
        return torch.zeros(())
    first = grads[0].device
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).to(first) for g in grads])
    total = torch.linalg.vector_norm(norms)
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale.to(g.device, g.dtype))
    return total
