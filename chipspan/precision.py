"""How arithmetic runs, the same in one process and under torchrun: what ``--fp16``, ``--bf16`` and
``--pure_bf16`` mean on a device (``choose_precision``, which ``plan`` prices and ``train`` runs),
autocast, and fp16 dynamic loss scaling (``LossScaler``).

    no flag        fp32 weights, fp32 arithmetic
    --fp16/--bf16  frozen weights in 16 bits (fp32 under --finetuning_type full), trained weights fp32,
                   forward under autocast to 16 bits; --fp16 adds a dynamic loss scale
    --pure_bf16    every weight bf16, trained ones too (bf16 gradients and AdamW moments), no autocast

On a device without fast 16-bit arithmetic (the CPU) the flags are ignored, with a notice: fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from chipspan.args import RunArguments
from chipspan.errors import ChipspanError

# Devices whose 16-bit arithmetic is slow or emulated: the flags are ignored there.
FP32_ONLY_DEVICE_TYPES = ("cpu",)


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run's precision flags come to on one device type."""

    device_type: str
    autocast_dtype: torch.dtype | None  # the forward's arithmetic under autocast; None: the weights' own
    loss_scaling: bool  # fp16: a dynamic loss scale guards the gradients against underflow
    base_dtype: torch.dtype  # frozen weights (and the activations without autocast)
    trained_dtype: torch.dtype  # trained weights, their gradients and AdamW moments
    ignored_flag: str | None = None  # a flag this device cannot honour (computes in fp32 instead)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the activations: autocast's, else the frozen weights'."""
        return self.autocast_dtype or self.base_dtype

    def notice(self) -> str | None:
        if self.ignored_flag is None:
            return None
        return (
            f"note: --{self.ignored_flag} is ignored on {self.device_type}, which has no fast "
            "half-precision arithmetic: computing in fp32"
        )


def choose_precision(run: RunArguments, device_type: str) -> PrecisionChoice:
    """The precision of ``run`` on ``device_type``; ChipspanError when more than one of its flags is set."""
    fp16, bf16, pure_bf16 = run.training.fp16, run.training.bf16, run.finetuning.pure_bf16
    if fp16 + bf16 + pure_bf16 > 1:
        raise ChipspanError("choose one of --fp16, --bf16 and --pure_bf16")
    flag = "fp16" if fp16 else "bf16" if bf16 else "pure_bf16" if pure_bf16 else None
    fp32 = PrecisionChoice(device_type, None, False, torch.float32, torch.float32)
    if flag is None:
        return fp32
    if device_type in FP32_ONLY_DEVICE_TYPES:
        return PrecisionChoice(device_type, None, False, torch.float32, torch.float32, ignored_flag=flag)
    if pure_bf16:
        return PrecisionChoice(device_type, None, False, torch.bfloat16, torch.bfloat16)
    half = torch.float16 if fp16 else torch.bfloat16
    base = torch.float32 if run.finetuning.finetuning_type == "full" else half
    return PrecisionChoice(device_type, half, fp16, base, torch.float32)


class LossScaler:
    """fp16 dynamic loss scaling, by ``torch.amp.GradScaler``'s rules, for any placement.

    The loss is multiplied by ``scale`` before backward, the gradients divided by it before clipping.
    Gradients holding inf/NaN skip the step and multiply the scale by ``backoff_factor``;
    ``growth_interval`` clean steps in a row multiply it by ``growth_factor``. Where gradients live in
    several processes, whether they overflowed is agreed by all of them (``unscale``'s ``any_rank``),
    so every process skips the same steps. The state has GradScaler's format (``scaler.pt``), so a
    checkpoint moves between one process and many.
    """

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

    def unscale(self, grads: list[torch.Tensor], any_rank: Callable[[bool], bool]) -> bool:
        """Divide ``grads`` by the scale; True when they (or any rank's, by ``any_rank``) overflowed."""
        inverse = 1.0 / self.scale
        found = []
        for grad in grads:
            grad.mul_(inverse)
            found.append((~torch.isfinite(grad)).any().to(grads[0].device))
        return any_rank(bool(torch.stack(found).any()) if found else False)

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
        scaler = {
            "scale": self.scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": self.growth_tracker,
        }
        return {"scaler": scaler, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, saved: dict) -> None:
        scaler = saved.get("scaler")
        if scaler:
            self.scale, self.growth_factor = float(scaler["scale"]), float(scaler["growth_factor"])
            self.backoff_factor, self.growth_interval = float(scaler["backoff_factor"]), int(scaler["growth_interval"])
            self.growth_tracker = int(scaler["_growth_tracker"])
        self.skipped_steps = int(saved.get("skipped_steps", 0))


class Precision:
    """A run's arithmetic while it trains: autocast as ``choice`` says, and its loss scaler (fp16)."""

    def __init__(self, choice: PrecisionChoice):
        self.choice = choice
        self.scaler = LossScaler() if choice.loss_scaling else None

    def autocast(self):
        """The context every forward (training and evaluation) runs in."""
        if self.choice.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.choice.device_type, dtype=self.choice.autocast_dtype)

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler else 1.0

    def unscale(self, grads: list[torch.Tensor], any_rank: Callable[[bool], bool]) -> bool:
        """Bring ``grads`` back to their true size; True when the step must be skipped (fp16 overflow)."""
        return self.scaler.unscale(grads, any_rank) if self.scaler else False

    def update(self, overflowed: bool) -> None:
        if self.scaler:
            self.scaler.update(overflowed)

    def state_dict(self) -> dict | None:
        """What ``scaler.pt`` holds; None without a loss scale (no file)."""
        return self.scaler.state_dict() if self.scaler else None

    def load_state_dict(self, saved: dict) -> None:
        if self.scaler:
            self.scaler.load_state_dict(saved)
