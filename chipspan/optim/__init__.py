"""Optimizers beside torch's AdamW, and the bytes each keeps (which the memory plan reads).

``adamw``: AdamW with 8-bit block-wise moments and stochastic rounding of 16-bit weights, on any
device. ``offload``: AdamW with fp32 master weights and moments in host memory, stepped there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def closure_loss(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """What an optimizer's ``step(closure)`` returns: the closure's loss, evaluated with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
