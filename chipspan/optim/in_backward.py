"""Stepping each weight inside backward (``--optimizer_in_bwd``, torchtune's ``optimizer_in_bwd``):
as soon as a trained parameter's gradient of the step is complete, chipspan's AdamW steps it and the
gradient is dropped, so a chip holds a few tensors' gradients at a time instead of all of its own.

A tied embedding spanned over chips lives twice (the embedding on the first stage, its copy as the
head on the last, ``chipspan.chips.gradients``): both copies wait for the end of backward, where the
runner sums their gradients and ``finish_step`` steps them, so they stay equal.

It asks for exactly one backward per optimizer step and for nothing that needs every gradient
before a weight may change; ``chipspan.chips.job.check_savers`` refuses, before anything loads,
gradient accumulation, clipping by the global norm, the fp16 loss scaler, the host-offloaded AdamW,
data-parallel replicas, and micro-batches under torchrun (each runs its own backward there).

A gradient holding inf/NaN is not applied: that parameter keeps its value and moments. The step's
global gradient norm is still measured (from each parameter's norm, taken before its step), so the
log and the non-finite guard see what they see without this option.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from chipspan.optim.adamw import AdamW


class StepInBackward:
    """Hooks that step each trained parameter of ``runner`` (a runner of ``chipspan.train.step``)
    with ``optimizer`` (None: this process trains nothing) the moment its gradient is accumulated;
    the copies of a tied embedding step in ``finish_step``. Keep this object while the parameters
    train: the hooks hold it only weakly."""

    def __init__(self, optimizer: AdamW | None, runner):
        self.optimizer = optimizer
        self.counted = list(runner.trained)  # the global norm's parameters, in its order
        self.tied = [*runner.embedding_copies, *runner.head_copies]
        groups = {p: group for group in optimizer.param_groups for p in group["params"]} if optimizer else {}
        if set(groups) != set(self.counted) | set(self.tied):
            raise ValueError("the optimizer must hold exactly the runner's trained parameters")
        self._groups = groups
        self._norms: dict[nn.Parameter, torch.Tensor] = {}
        self._stepped = 0  # parameters stepped in the step being run
        this = weakref.ref(self)  # the hooks live in autograd's C++ nodes: a strong reference would leak the model
        waiting = set(self.tied)
        for p in self.counted:
            if p not in waiting:
                p.register_post_accumulate_grad_hook(lambda param: this()._step(param))

    def _step(self, param: nn.Parameter) -> None:
        """Step ``param`` with its complete gradient, unless the gradient is not finite; drop it."""
        norm = torch.linalg.vector_norm(param.grad, dtype=torch.float32)  # fp32 scalar on param's chip
        self._norms[param] = norm
        if bool(torch.isfinite(norm)):
            self.optimizer.step_parameter(param, self._groups[param])
            self._stepped += 1
        param.grad = None

    def finish_step(self) -> tuple[list[torch.Tensor], int]:
        """After backward, once the runner has summed the tied copies' gradients: step the copies;
        (the gradient norms of the step, fp32 scalars in the global norm's order; how many
        parameters stepped), forgotten here for the next step."""
        for p in self.tied:
            if p.grad is not None:
                self._step(p)
        norms = [self._norms[p] for p in self.counted if p in self._norms]
        stepped, self._norms, self._stepped = self._stepped, {}, 0
        return norms, stepped
