"""Every stage in this process, one chip each: how ``chipspan.train.step.TrainStep`` runs a step here.

Each accumulation batch runs as GPipe micro-batches (``chipspan.chips.pipeline``) under autocast, its
loss divided by the accumulation steps and multiplied by the loss scale before backward; the
gradients add up in ``.grad`` over the accumulation steps. There is one process, so every
"over the ranks" reduction is the value itself.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from chipspan.chips.gradients import (
    clip_global_norm,
    global_norm,
    sum_tied_gradients,
    tied_copies,
    trained_parameters,
)
from chipspan.chips.pipeline import pipelined_loss
from chipspan.chips.span import SpannedModel


class ChipsRunner:
    replica, replicas = 0, 1  # one copy of the model

    def __init__(self, model: SpannedModel, micro_batches: int, autocast: Callable[[], AbstractContextManager]):
        self.model, self.micro_batches, self.autocast = model, micro_batches, autocast
        self.device = model.placement.devices[0]
        self.embedding_copies, self.head_copies = tied_copies(list(model.stages), len(model.stages))
        self.trained = trained_parameters(list(model.stages), self.head_copies)

    def set_training(self, mode: bool) -> None:
        self.model.train(mode)

    def forward_backward(self, batches: list[dict[str, torch.Tensor]], loss_scale: float) -> float:
        """Forward and backward of a step's accumulation batches (input_ids, labels, attention_mask
        (b, s) on the host); returns the step's loss, the mean over batches of each one's token mean."""
        total = 0.0
        for batch in batches:
            with self.autocast():
                loss = pipelined_loss(self.model, batch, self.micro_batches) / len(batches)
            (loss * loss_scale).backward()
            total += loss.item()
        return total

    def gradients(self) -> list[torch.Tensor]:
        """Every gradient the step applies (a tied head copy's too)."""
        return [p.grad for p in self.trained + self.head_copies if p.grad is not None]

    def join_tied_gradients(self) -> None:
        """Give both copies of a tied embedding the sum of their gradients."""
        sum_tied_gradients(self.embedding_copies + self.head_copies)

    def clip_gradients(self, max_norm: float) -> float:
        """Sum the tied copies' gradients, clip the global norm (0: only measure); the norm before."""
        self.join_tied_gradients()
        return clip_global_norm(self.trained, max_norm, self.device, also_scaled=self.head_copies)

    def gradient_norm(self, norms: list[torch.Tensor]) -> float:
        """The global norm of gradients already applied, from their own norms (--optimizer_in_bwd)."""
        return float(global_norm(norms, self.device))

    @torch.no_grad()
    def forward_only(self, batch: dict[str, torch.Tensor]) -> float:
        """The token-mean loss of one batch (input_ids, labels, attention_mask (b, s))."""
        with self.autocast():
            return float(self.model(batch["input_ids"], batch["labels"], batch["attention_mask"]))

    def sum_over_ranks(self, value: float) -> float:
        return value

    def max_over_ranks(self, value: float) -> float:
        return value

    def any_rank(self, flag: bool) -> bool:
        return flag
