"""One pipeline stage's module: a ``CausalLM`` piece plus what crosses the stage boundary.

    first stage:  forward(input_ids (b, s), attention_mask (b, s), position_ids (b, s))  -> hidden (b, s, h)
    middle stage: forward(hidden (b, s, h), attention_mask, position_ids)               -> hidden (b, s, h)
    last stage:   forward(hidden, attention_mask, position_ids, labels (b, s), loss_weight (b,)) -> loss (1,)

The forward runs under the run's autocast, as one process runs it. Only the hidden states travel
between ranks; every stage gets its micro-batch of the attention mask and the positions (counted
on the host) from the schedule, and rebuilds the attention mask from them. The last stage
returns the micro-batch's *sum* of token losses times its ``loss_weight`` (the same for every row of
a micro-batch: 1 / (trained tokens of the whole global batch × gradient accumulation steps)), so the
micro-batch losses add up to the loss a single process computes and the gradients need no further
scaling. It is a one-element tensor, not a scalar: torch 2.8's schedules concatenate the last
stage's outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from chipspan.models.config import ModelConfig
from chipspan.models.decoder import CausalLM, build_attention_mask
from chipspan.models.weights import load_pretrained
from chipspan.quant import QuantSettings


class PipelinePiece(nn.Module):
    def __init__(self, piece: CausalLM, activation_dtype: torch.dtype, autocast: Callable[[], AbstractContextManager]):
        super().__init__()
        self.piece = piece
        self.autocast = autocast  # the run's precision (chipspan.precision.Precision.autocast)
        self.activation_dtype = activation_dtype  # what crosses to the next stage
        self.is_first = piece.model.embed_tokens is not None
        self.is_last = piece.lm_head is not None

    def forward(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with self.autocast():
            return self._forward(inputs, attention_mask, position_ids, labels, loss_weight)

    def _forward(self, inputs, attention_mask, positions, labels, loss_weight) -> torch.Tensor:
        mask = build_attention_mask(attention_mask, attention_mask.shape[1], 0, attention_mask.device)
        hidden = self.piece.embed(inputs) if self.is_first else inputs
        hidden = self.piece.run_layers(hidden, positions, mask)
        if self.is_last:
            return (self.piece.loss(hidden, labels, reduction="sum") * loss_weight[0]).reshape(1)
        if not hidden.requires_grad and torch.is_grad_enabled():
            hidden.requires_grad_()  # nothing trains up to here: the schedule still sends a gradient back
        return hidden.to(self.activation_dtype)


def load_stage(
    weights: str | Path,
    config: ModelConfig,
    split: list[range],
    stage: int,
    dtype: torch.dtype,
    device: torch.device,
    quant: QuantSettings | None = None,
) -> CausalLM:
    """Read only stage ``stage``'s slice of the model folder's weights: its layers (``split[stage]``, the
    decoder layers of every stage in order), the embeddings on the first stage, the final norm
    and head on the last; with ``quant``, the layers' linear weights quantized as they arrive."""
    last = len(split) - 1
    return load_pretrained(
        weights, dtype=dtype, device=device, layers=split[stage], embed=stage == 0, head=stage == last, quant=quant
    )
