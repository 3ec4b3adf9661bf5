"""Training health, the same for every placement: a run whose numbers stop being finite stops with a
clear error instead of "succeeding" at nothing, and no weights holding inf/NaN are ever written.
(Examples with no token to train on are dropped and counted by the data loader, and a dataset left
with none is refused there, before a weight is read.)

fp16's dynamic loss scaler already skips steps whose gradients overflow (that is how it finds its
scale); :class:`NonFiniteGuard` leaves those to it and watches the loss itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from chipspan.errors import ChipspanError

NONFINITE_STEP_LIMIT = 3  # optimizer steps in a row with an inf/NaN loss or gradient norm before the run stops


class NonFiniteGuard:
    """Decides whether an optimizer step may be applied, and stops a run that keeps failing.

    A step whose loss or gradient norm is inf/NaN is not applied (the weights and the learning-rate
    schedule stay as they were) and is counted in ``skipped_steps``; ``limit`` such steps in a row
    raise :class:`ChipspanError`. Under fp16 loss scaling (``scaled``) the scaler itself skips a step
    whose gradients are not finite (a NaN loss gives NaN gradients), so the guard lets the step
    through to it and only counts inf/NaN losses towards the limit.
    """

    def __init__(self, learning_rate: float, scaled: bool, limit: int = NONFINITE_STEP_LIMIT):
        self.learning_rate, self.scaled, self.limit = learning_rate, scaled, limit
        self.in_a_row = 0
        self.skipped_steps = 0

    def allows(self, step: int, loss: float, grad_norm: float, report) -> bool:
        """Whether optimizer step ``step`` (1-based) with this loss and gradient norm may be applied."""
        if math.isfinite(loss) and (self.scaled or math.isfinite(grad_norm)):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        numbers = f"loss {loss}" if self.scaled else f"loss {loss}, gradient norm {grad_norm}"
        if self.in_a_row >= self.limit:
            raise ChipspanError(
                f"training diverged: steps {step - self.limit + 1}-{step} all had a non-finite {numbers}, and "
                f"none was applied; lower --learning_rate (now {self.learning_rate:g}), keep --max_grad_norm "
                "on, or check the data; nothing was saved for these steps, earlier checkpoints are intact"
            )
        report(
            f"warning: step {step} has a non-finite {numbers}; it is not applied "
            f"({self.in_a_row} in a row; {self.limit} stop the run)"
        )
        if self.scaled:
            return True  # the loss scaler finds the NaN gradients and skips the step itself
        self.skipped_steps += 1
        return False


def nonfinite_weight(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first trained tensor holding inf/NaN, None when all are finite."""
    for name, param in named_parameters:
        if param.requires_grad and not bool(torch.isfinite(param).all()):
            return name
    return None


def refuse_nonfinite_weights(name: str | None, where: str) -> None:
    """Stop before writing ``where`` when trained tensor ``name`` holds inf/NaN (None: all finite)."""
    if name is not None:
        raise ChipspanError(
            f"the trained weight {name} holds inf/NaN, so {where} was not written; lower "
            "--learning_rate or check the data, and resume from an earlier checkpoint"
        )
