"""One optimizer step, and one evaluation, for every placement.

A *runner* holds the stages one process runs — every stage, one chip each
(``chipspan.chips.runner.ChipsRunner``), or this rank's stages of a torchrun pipeline
(``chipspan.distributed.runner.RankRunner``) — and knows how to run a batch through them:

    forward_backward(batches, loss_scale) -> the step's loss (the same on every rank)
    gradients()                           -> the gradients this process applies
    join_tied_gradients()                 -> both copies of a tied embedding get their summed gradient
    clip_gradients(max_norm)              -> the global norm before clipping (tied copies summed)
    gradient_norm(norms)                  -> the global norm of gradients from their own norms
    forward_only(batch)                   -> a batch's token-mean loss where the last stage is, else None
    sum_over_ranks / max_over_ranks / any_rank, replica / replicas, set_training(mode)

``TrainStep`` is the rest, written once: unscale (fp16), clip, the non-finite guard, AdamW and the
learning-rate schedule, skipped together by every rank when a step must not be applied. Under
--optimizer_in_bwd AdamW has stepped each weight inside backward (``chipspan.optim.in_backward``);
what is left is the norm, the guard and the schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from chipspan.data import Example, collate
from chipspan.optim.in_backward import StepInBackward
from chipspan.precision import Precision
from chipspan.train.health import NonFiniteGuard


class TrainStep:
    def __init__(
        self,
        runner,
        optimizer: torch.optim.Optimizer | None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        precision: Precision,
        max_grad_norm: float,
        learning_rate: float,
        in_backward: StepInBackward | None = None,
    ):
        """``optimizer``/``scheduler``: None on a rank whose stages train nothing (it still takes
        part); ``in_backward``: the hooks that step ``optimizer`` inside backward, if so."""
        self.runner, self.optimizer, self.scheduler = runner, optimizer, scheduler
        self.in_backward = in_backward
        self.precision, self.max_grad_norm = precision, max_grad_norm
        self.guard = NonFiniteGuard(learning_rate, scaled=precision.scaler is not None)

    def __call__(
        self, number: int, batches: list[dict[str, torch.Tensor]], report: Callable[[str], None]
    ) -> tuple[float, float]:
        """Optimizer step ``number`` (1-based) over its accumulation ``batches``; (loss, gradient norm).

        A step whose gradients overflow under fp16 loss scaling, or whose loss or gradient norm is
        inf/NaN, leaves the weights and the learning rate as they were."""
        loss = self.runner.forward_backward(batches, self.precision.loss_scale)
        if self.in_backward is not None:
            return loss, self._finish_stepped_in_backward(number, loss, report)
        overflowed = self.precision.unscale(self.runner.gradients(), self.runner.any_rank)
        grad_norm = self.runner.clip_gradients(self.max_grad_norm)
        applied = self.guard.allows(number, loss, grad_norm, report) and not overflowed
        if self.optimizer is not None:
            if applied:
                self.optimizer.step()
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.precision.update(overflowed)
        return loss, grad_norm

    def _finish_stepped_in_backward(self, number: int, loss: float, report: Callable[[str], None]) -> float:
        """The global gradient norm of a step whose weights were stepped in backward; the schedule
        moves on unless the guard refuses the step (whose finite gradients are applied already)."""
        self.runner.join_tied_gradients()
        norms, stepped = self.in_backward.finish_step()
        grad_norm = self.runner.gradient_norm(norms)
        stepped = int(self.runner.sum_over_ranks(stepped))
        if self.guard.allows(number, loss, grad_norm, report):
            if self.optimizer is not None:
                self.optimizer.step()  # no gradient is left, so nothing steps: it tells the scheduler
                self.scheduler.step()
        elif stepped:
            report(f"warning: under --optimizer_in_bwd, {stepped} parameter(s) with finite gradients already stepped")
        return grad_norm

    def learning_rate(self) -> float:
        """The learning rate of the next step, as the scheduler has it (a collective under torchrun)."""
        mine = self.scheduler.get_last_lr()[0] if self.scheduler is not None else 0.0
        return self.runner.max_over_ranks(mine)

    def set_training(self, mode: bool) -> None:
        self.runner.set_training(mode)


def eval_loss(runner, examples: Sequence[Example], pad_id: int, batch_size: int) -> float:
    """The Hugging Face Trainer's ``eval_loss``: the mean over examples of their batch's token-mean
    loss, ``batch_size`` examples at a time, in order. Replica r of R runs batches r, r + R, …; every
    rank takes part."""
    runner.set_training(False)
    total = 0.0
    for number, start in enumerate(range(0, len(examples), batch_size)):
        if number % runner.replicas != runner.replica:
            continue
        chunk = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        loss = runner.forward_only(collate(chunk, pad_id))
        total += loss * len(chunk) if loss is not None else 0.0
    runner.set_training(True)
    return runner.sum_over_ranks(total) / len(examples)
