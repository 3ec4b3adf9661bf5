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

from dataclasses import dataclass

import torch

from chipspan.args import RunArguments

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
    """The precision of ``run`` (at most one of its flags set) on ``device_type``."""
    fp16, bf16, pure_bf16 = run.training.fp16, run.training.bf16, run.finetuning.pure_bf16
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
