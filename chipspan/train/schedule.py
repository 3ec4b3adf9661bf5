"""Learning-rate schedules, as the Hugging Face Trainer defines them (LLaMA-Factory 0.5's trainer)."""

from __future__ import annotations

import math

import torch


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """``warmup_steps`` when set, else ``ceil(warmup_ratio * total_steps)``."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)


def lr_factor(kind: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate for the optimizer step numbered ``step`` (from 0);
    ``kind``: one of ``args.LR_SCHEDULER_TYPES`` (checked when the arguments are built)."""
    if kind == "constant":
        return 1.0
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(kind, step, total_steps, warmup_steps))
