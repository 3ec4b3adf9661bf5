"""The training job in the memory model's terms (``Job``), built once from a run's arguments and
the precision it runs in (``job_of``); and which path a `train` takes (``one_process_per_chip``).

The plan prices a ``Job`` and ``train`` places the model from the same one, so both see the same
bytes per weight, the same micro-batches and the same path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from chipspan.args import RunArguments
from chipspan.errors import ChipspanError
from chipspan.precision import PrecisionChoice
from chipspan.quant import QuantSettings


@dataclass(frozen=True)
class Job:
    """What one training step computes and keeps, in the terms the byte counts need.

    Bytes per element: ``base_bytes`` the frozen weights and the residual stream between layers;
    ``compute_bytes`` the activations inside a layer (autocast's dtype, else the base's);
    ``trained_bytes``, ``gradient_bytes``, ``moment_bytes`` a trained weight, its gradient and each
    of AdamW's two moments. The defaults are fp32 throughout.

    The savers: ``quant`` stores the decoder layers' frozen linear weights quantized (LoRA);
    ``moment_bits`` 8 keeps AdamW's moments block-wise in 8 bits; ``offload_optimizer`` keeps the
    fp32 master weights and moments in host memory and steps them there; ``stochastic_rounding``
    rounds 16-bit trained weights' updates at random (chipspan's AdamW, fp32 scratch per chunk);
    ``optimizer_in_backward`` steps each weight as soon as its gradient is complete, so a chip holds
    a gradient or two at a time, not all of its own.
    """

    finetuning_type: str  # "lora", "full" or "freeze" (validated with the run's arguments)
    seq_len: int  # tokens per example (cutoff_len)
    batch: int  # examples per micro-batch
    gradient_checkpointing: bool = False  # keep each layer's input, recompute the rest in backward
    base_bytes: int = 4
    compute_bytes: int = 4
    autocast: bool = False  # the forward runs under autocast (16-bit copies of fp32 weights)
    trained_bytes: int = 4
    gradient_bytes: int = 4
    moment_bytes: int = 4
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # ("all",): every linear layer
    num_layer_trainable: int = 3  # freeze: the last N layers train (the first -N when negative)
    name_module_trainable: str = "mlp"  # freeze: mlp, self_attn or all
    micro_batches_in_flight: int = 1  # micro-batches whose activations a chip holds at once
    gradients_held: bool = False  # gradients of earlier micro-batches alive while a chip runs the next
    quant: QuantSettings | None = None
    moment_bits: int = 32
    offload_optimizer: bool = False
    stochastic_rounding: bool = False
    optimizer_in_backward: bool = False

    def __post_init__(self):
        sizes = (self.base_bytes, self.compute_bytes, self.trained_bytes, self.gradient_bytes, self.moment_bytes)
        if any(size not in (2, 4) for size in sizes):
            raise ChipspanError(f"bytes per element must be 2 (fp16/bf16) or 4 (fp32), not {sizes}")
        if self.moment_bits not in (8, 32):
            raise ChipspanError(f"AdamW's moments are kept in 8 or 32 bits, not {self.moment_bits}")
        if min(self.seq_len, self.batch, self.micro_batches_in_flight) < 1:
            raise ChipspanError("seq_len, batch and micro_batches_in_flight must be at least 1")

    @property
    def tokens(self) -> int:
        """N: tokens per micro-batch."""
        return self.seq_len * self.batch


def job_of(run: RunArguments, precision: PrecisionChoice, micro_batches: int | None = None) -> Job:
    """The job of ``run`` computed as ``precision`` says, each batch cut into ``micro_batches``
    (default --micro_batches, else 1) of ceil(batch / M) examples; ChipspanError when M does not
    fit the batch. The micro-batches in flight come from the schedule (``Schedule``); one process
    holds the gradients of earlier accumulation steps while it runs the next (one process per chip
    runs a step's accumulation steps as micro-batches of one schedule)."""
    check_savers(run, precision)
    ft, train = run.finetuning, run.training
    batch, micro = train.per_device_train_batch_size, micro_batches or train.micro_batches or 1
    if not 1 <= micro <= max(batch, 1):
        raise ChipspanError(
            f"--micro_batches {micro} must be between 1 and per_device_train_batch_size ({batch}): "
            "each micro-batch needs at least one example"
        )
    targets = tuple(t.strip() for t in (ft.lora_target or "q_proj,v_proj").split(",") if t.strip())
    trained = precision.trained_dtype.itemsize  # gradients and AdamW moments take the weight's dtype
    return Job(
        finetuning_type=ft.finetuning_type,
        seq_len=run.data.cutoff_len,
        batch=math.ceil(batch / micro),
        gradient_checkpointing=not train.disable_gradient_checkpointing,
        base_bytes=precision.base_dtype.itemsize,
        compute_bytes=precision.compute_dtype.itemsize,
        autocast=precision.autocast_dtype is not None,
        trained_bytes=trained,
        gradient_bytes=trained,
        moment_bytes=trained,
        lora_rank=ft.lora_rank,
        lora_targets=targets,
        num_layer_trainable=ft.num_layer_trainable,
        name_module_trainable=ft.name_module_trainable,
        gradients_held=train.gradient_accumulation_steps > 1 and not one_process_per_chip(run),
        quant=quant_settings(run),
        moment_bits=train.moment_bits,
        offload_optimizer=train.offload_optimizer,
        stochastic_rounding=rounds_stochastically(run, precision),
        optimizer_in_backward=train.optimizer_in_bwd,
    )


def quant_settings(run: RunArguments) -> QuantSettings | None:
    """How the frozen base is quantized as it loads (--quantization_bit and its options), or None."""
    model = run.model
    if model.quantization_bit is None:
        return None
    return QuantSettings(model.quantization_bit, model.quantization_type, model.double_quantization)


def rounds_stochastically(run: RunArguments, precision: PrecisionChoice) -> bool:
    """Whether AdamW rounds the update of 16-bit trained weights at random: --stochastic_rounding
    (on by default) where the trained weights are 16-bit (--pure_bf16) and stepped on the chip."""
    return (
        run.finetuning.stochastic_rounding
        and precision.trained_dtype.itemsize == 2
        and not run.training.offload_optimizer
    )


def check_savers(run: RunArguments, precision: PrecisionChoice) -> None:
    """Refuse memory savers that cannot go together (in ``precision``), in one line, before anything loads."""
    ft, train = run.finetuning, run.training
    if run.model.quantization_bit is not None and ft.finetuning_type != "lora":
        raise ChipspanError(
            f"--quantization_bit {run.model.quantization_bit} quantizes a frozen base, so it needs "
            f"--finetuning_type lora, not {ft.finetuning_type} (full and freeze train the base's own "
            "weights); use --optim adamw_8bit or --offload_optimizer to fit those in less memory"
        )
    if train.offload_optimizer and train.optim == "adamw_8bit":
        raise ChipspanError(
            "--offload_optimizer keeps AdamW's moments in host memory in fp32, so --optim adamw_8bit has "
            "nothing left to save on the chip: choose one (adamw_8bit keeps 2 bytes of moments per weight "
            "on the chip; offloading keeps none there)"
        )
    if train.optimizer_in_bwd:
        _check_steps_in_backward(run, precision)


def _check_steps_in_backward(run: RunArguments, precision: PrecisionChoice) -> None:
    """Refuse with --optimizer_in_bwd what needs every gradient of a step before a weight changes,
    or more than one backward per step (``chipspan.optim.in_backward``)."""
    train = run.training
    processes = one_process_per_chip(run)
    conflicts = [
        (
            train.gradient_accumulation_steps > 1,
            f"--gradient_accumulation_steps {train.gradient_accumulation_steps}",
            "each weight would step after the first batch's backward; use a larger per_device_train_batch_size "
            "(--micro_batches keeps each micro-batch small)",
        ),
        (
            train.max_grad_norm > 0,
            f"--max_grad_norm {train.max_grad_norm:g}",
            "clipping by the global norm needs every gradient before the first step; add --max_grad_norm 0",
        ),
        (
            precision.loss_scaling,
            "--fp16",
            "the loss scaler skips a step only after seeing every gradient; use --bf16 or --pure_bf16",
        ),
        (train.offload_optimizer, "--offload_optimizer", "the host already steps while the chips go on; choose one"),
        (
            processes and run.chips.data_parallel > 1,
            f"--data_parallel {run.chips.data_parallel}",
            "the replicas' gradients are summed only after backward; use --data_parallel 1",
        ),
        (
            processes and (train.micro_batches or 1) > 1,
            f"--micro_batches {train.micro_batches}",
            "under torchrun each micro-batch runs its own backward, so gradients add up anyway; use --micro_batches 1, "
            "or span the chips in one process (one backward over every micro-batch)",
        ),
        (
            processes and run.chips.pipeline_schedule != "gpipe",
            f"--pipeline_schedule {run.chips.pipeline_schedule}",
            "under torchrun it runs one micro-batch per step, fewer than torch's 1F1B schedules take; "
            "use --pipeline_schedule gpipe, or span the chips in one process",
        ),
    ]
    for refused, flag, reason in conflicts:
        if refused:
            raise ChipspanError(f"--optimizer_in_bwd cannot go with {flag}: {reason}")


def one_process_per_chip(run: RunArguments, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `train` runs as one process per chip: --launcher torchrun (this process starts the
    torchrun job, or is one of its ranks), or a rank of a torchrun job of several processes.
    Otherwise one process drives every chip. The one rule the plan, `train` and the CLI follow
    (--launcher is one of ``args.LAUNCHERS``, checked when the arguments are built)."""
    return run.chips.launcher is not None or (under_torchrun(environ) and int(environ.get("WORLD_SIZE", "1")) > 1)


def under_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started by torchrun (rather than having to start it)."""
    return "TORCHELASTIC_RUN_ID" in environ or "LOCAL_RANK" in environ
