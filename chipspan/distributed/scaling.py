"""fp16 dynamic loss scaling that every rank agrees on.

A rank sees only its own stages' gradients, so one rank may find inf/NaN where the others find
none. ``torch.amp.GradScaler`` decides per process; here the found-inf flag is all-reduced (MAX)
over the whole world, so every rank skips the same steps and moves its scale the same way.
The rules are GradScaler's: the loss is multiplied by the scale (on the last stage; the backward
carries it through every stage), the gradients are divided by it before clipping, an overflow skips
the step and multiplies the scale by ``backoff_factor``, and ``growth_interval`` clean steps in a row
multiply it by ``growth_factor``. The state is saved in GradScaler's format (``scaler.pt``), so a
checkpoint moves between one process and many.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class LossScaler:
    def __init__(
        self,
        scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        self.scale, self.growth_factor, self.backoff_factor = scale, growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.growth_tracker = 0  # clean steps in a row since the scale last changed
        self.skipped_steps = 0

    @classmethod
    def like(cls, scaler: torch.amp.GradScaler) -> LossScaler:
        """A scaler with ``scaler``'s settings (what the single process would use)."""
        return cls(
            scaler.get_scale(), scaler.get_growth_factor(), scaler.get_backoff_factor(), scaler.get_growth_interval()
        )

    def unscale(self, grads: list[torch.Tensor], device: torch.device) -> bool:
        """Divide ``grads`` (this rank's) by the scale; True when any rank's gradients overflowed.

        A collective: every rank must call it, with its gradients or none."""
        inverse = 1.0 / self.scale
        found = torch.zeros((), dtype=torch.float32, device=device)
        for grad in grads:
            grad.mul_(inverse)
            found = torch.maximum(found, (~torch.isfinite(grad)).any().to(device, torch.float32))
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return bool(found)

    def update(self, overflowed: bool) -> None:
        """After the step (taken or skipped): back off on overflow, grow after enough clean steps."""
        if overflowed:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            self.skipped_steps += 1
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        """``scaler.pt``: {"scaler": GradScaler.state_dict() format, "skipped_steps": n}."""
        return {
            "scaler": {
                "scale": self.scale,
                "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval,
                "_growth_tracker": self.growth_tracker,
            },
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, saved: dict) -> None:
        scaler = saved.get("scaler")
        if scaler:
            self.scale, self.growth_factor = float(scaler["scale"]), float(scaler["growth_factor"])
            self.backoff_factor, self.growth_interval = float(scaler["backoff_factor"]), int(scaler["growth_interval"])
            self.growth_tracker = int(scaler["_growth_tracker"])
        self.skipped_steps = saved.get("skipped_steps", 0)
