"""Predicted against measured peak memory of a training step, chip by chip.

    python bench/memory_check.py fake --config tests/fixtures/configs/llama2-7b.json \
        --finetuning lora --fp16 --split 1,1            # 7B shapes, nothing allocated
    python bench/memory_check.py emu --layers 4 --hidden 256 --finetuning full --split 2,2

Both modes run chipspan's own code — ``SpannedModel`` over one device per chip, the recipe's
AdamW, ``chipspan.precision.Precision`` (autocast and, for fp16, a loss scaler) — for ``--steps`` optimizer
steps (default 2: the second has AdamW's moments alive during backward, as every later step does)
and report each chip's peak next to ``chipspan.chips.memory.estimate`` for the same slice.

- ``fake``: the model lives on fake ``emu`` chips under ``FakeTensorMode`` (no memory, no
  arithmetic), so real 7B/13B shapes run in seconds. ``Tracker`` follows every storage an op
  creates until it is freed and keeps each chip's peak. The device is ``emu`` so that autocast,
  AdamW's ``foreach`` path and the attention kernel are the ones a chip gets; the attention
  kernel is chosen as emu chooses it (the CPU's choice), and the loss's data-dependent steps
  (``nonzero``, ``int(mask.sum())``, boolean indexing) are answered with the known count of
  scored tokens.
  The GradScaler is left out (it only scales a scalar and unscales gradients in place).
- ``emu``: a small random model really trains on emulated chips; the peak is emu's own per-chip
  statistic (``chipspan.emu.peak_memory``), and ``Tracker``'s count is shown beside it.

``measure`` and ``predict`` are importable (tests/test_plan.py uses them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chipspan.args import FinetuningArguments, TrainingArguments, parse_run_arguments  # noqa: E402
from chipspan.chips.job import Job as PlanJob  # noqa: E402
from chipspan.chips.job import job_of  # noqa: E402
from chipspan.chips.memory import GIB, estimate  # noqa: E402
from chipspan.chips.placement import Placement  # noqa: E402
from chipspan.chips.runner import ChipsRunner  # noqa: E402
from chipspan.chips.span import SpannedModel  # noqa: E402
from chipspan.models.config import ModelConfig  # noqa: E402
from chipspan.models.decoder import CausalLM  # noqa: E402
from chipspan.models.weights import quantize_decoder_linears  # noqa: E402
from chipspan.optim.in_backward import StepInBackward  # noqa: E402
from chipspan.precision import Precision, PrecisionChoice, choose_precision  # noqa: E402
from chipspan.train.finetune import prepare_trainable  # noqa: E402
from chipspan.train.optim import build_optimizer, settle  # noqa: E402

aten = torch.ops.aten
PHASES = ("forward", "backward", "step")


@dataclass
class Job:
    """One training job, in ``train``'s terms."""

    finetuning_type: str = "lora"
    half: bool = False  # --fp16: autocast to fp16 (frozen fp16 base for lora/freeze), GradScaler
    pure_bf16: bool = False  # --pure_bf16: every weight bf16, trained ones too, no autocast
    seq_len: int = 1024
    batch: int = 1
    gradient_checkpointing: bool = False
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    micro_batches_in_flight: int = 1  # forwards run before one backward (GPipe-style)
    num_layer_trainable: int = 3
    name_module_trainable: str = "mlp"
    quantization_bit: int | None = None  # LoRA's base quantized (nf4 with double quantization at 4)
    optim: str = "adamw_torch"  # or adamw_8bit
    offload_optimizer: bool = False
    optimizer_in_bwd: bool = False  # each weight steps inside backward (no clipping: --max_grad_norm 0)

    def run_arguments(self):
        """The `train` flags of this job (one micro-batch per batch)."""
        precision = ["--fp16"] if self.half else ["--pure_bf16"] if self.pure_bf16 else []
        flags = [
            *("--finetuning_type", self.finetuning_type, "--lora_target", ",".join(self.lora_targets)),
            *("--lora_rank", str(self.lora_rank), "--cutoff_len", str(self.seq_len)),
            *("--per_device_train_batch_size", str(self.batch), "--num_layer_trainable", str(self.num_layer_trainable)),
            *("--name_module_trainable", self.name_module_trainable, *precision),
            *("--optim", self.optim, *(["--offload_optimizer"] if self.offload_optimizer else [])),
            *(["--quantization_bit", str(self.quantization_bit)] if self.quantization_bit else []),
            *(["--optimizer_in_bwd", "--max_grad_norm", "0"] if self.optimizer_in_bwd else []),
        ]
        return parse_run_arguments(
            flags if self.gradient_checkpointing else [*flags, "--disable_gradient_checkpointing"], {}
        )

    def precision(self) -> PrecisionChoice:
        """What the flags come to on a chip (emu, which honours them)."""
        return choose_precision(self.run_arguments(), "emu")

    def plan_job(self) -> PlanJob:
        """What ``estimate`` prices: the plan's job of these flags, with this many micro-batches in flight."""
        job = job_of(self.run_arguments(), self.precision())
        return dataclasses.replace(job, micro_batches_in_flight=self.micro_batches_in_flight)


# --- the tracker ---------------------------------------------------------------------------------


@dataclass
class Tracker(TorchDispatchMode):
    """Live and peak bytes per device, from the storages that ops create.

    Each new storage an op returns is counted on the output's device until the storage is freed
    (a weak-reference finalizer). ``phase`` labels the peaks: ``peaks[device][phase]``.
    With ``fake=True`` it also answers what ``FakeTensorMode`` cannot (see the module notes);
    ``true_count`` is the number of True entries of any boolean mask met there.
    """

    fake: bool = False
    true_count: int = 0
    phase: str = "setup"
    live: dict = field(default_factory=dict)  # device -> bytes
    peaks: dict = field(default_factory=dict)  # device -> phase -> bytes
    _storages: dict = field(default_factory=dict)  # id(storage) -> (device, bytes)
    memo: dict | None = None  # emptied after every op (see measure)

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.fake:
            answered, out = self._answer_fake(func, args, kwargs)
            if not answered:
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if self.memo:
            self.memo.clear()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._see(t)
        if func is aten.logsumexp.default:
            # ATen's logsumexp (every device) allocates exp(x - max) inside the op, as big as x
            self._transient(str(args[0].device), args[0].untyped_storage().nbytes())
        return out

    def _transient(self, device: str, size: int) -> None:
        phases = self.peaks.setdefault(device, {})
        phases[self.phase] = max(phases.get(self.phase, 0), self.live.get(device, 0) + size)

    def reset_peaks(self) -> None:
        self.peaks = {}

    def peak(self, device) -> int:
        return max(self.peaks.get(str(device), {}).values(), default=self.live.get(str(device), 0))

    def _see(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size, device = id(storage), storage.nbytes(), str(t.device)
        known = self._storages.get(key)
        if known is not None and known[1] == size:
            return
        if known is None:
            weakref.finalize(storage, self._free, key)
        self._storages[key] = (device, size)
        self.live[device] = self.live.get(device, 0) + size - (known[1] if known else 0)
        phases = self.peaks.setdefault(device, {})
        phases[self.phase] = max(phases.get(self.phase, 0), self.live[device])

    def _free(self, key: int) -> None:
        device, size = self._storages.pop(key)
        self.live[device] -= size

    def _answer_fake(self, func, args, kwargs):
        """(True, result) for the ops fake tensors cannot run as chipspan runs them; else (False, None)."""
        if func is aten._fused_sdp_choice.default:  # emu takes the CPU's choice of attention kernel
            with _disable_current_modes():
                real = [torch.empty(a.shape, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
                return True, func(*real, **kwargs)
        if func is aten.nonzero.default:  # the loss's scored positions: the known count
            return True, torch.empty(self.true_count, args[0].dim(), dtype=torch.long, device=args[0].device)
        if func is aten._local_scalar_dense.default:  # .item(): the fake value if known, else the count
            try:
                return True, func(*args, **kwargs)
            except Exception:  # noqa: BLE001 - data-dependent: int(mask.sum()) in the loss
                return True, True if args[0].dtype == torch.bool else self.true_count
        if func in (
            aten.index.Tensor,
            aten.index_put_.default,
            aten.index_put.default,
            aten._index_put_impl_.default,
        ) and any(i is not None and i.dtype == torch.bool for i in args[1]):
            indices = []
            for i in args[1]:
                if i is not None and i.dtype == torch.bool:  # a k-dim mask is k index vectors
                    indices += [torch.empty(self.true_count, dtype=torch.long, device=i.device)] * i.dim()
                else:
                    indices.append(i)
            return True, func(args[0], indices, *args[2:], **kwargs)
        return False, None


# --- building and running chipspan's step --------------------------------------------------------


def build(config: ModelConfig, split: list[int], job: Job, devices: list[torch.device]):
    """A SpannedModel with ``split[i]`` layers on ``devices[i]``, prepared as ``train`` prepares it,
    its AdamW and Precision (random weights; under FakeTensorMode, fake ones), and the hooks that step
    AdamW inside backward (--optimizer_in_bwd; else None)."""
    starts = [sum(split[:i]) for i in range(len(split))]
    layers = tuple(range(a, a + n) for a, n in zip(starts, split))
    precision = job.precision()
    stages, default = [], torch.get_default_dtype()
    torch.set_default_dtype(precision.base_dtype)  # built in the load dtype, as loaded
    try:
        for i, (device, r) in enumerate(zip(devices, layers)):
            with torch.device(device):
                stages.append(CausalLM(config, layers=r, embed=i == 0, head=i == len(split) - 1))
    finally:
        torch.set_default_dtype(default)
    model = SpannedModel(stages, Placement(tuple(devices), layers))
    plan_job = job.plan_job()
    for stage in model.stages:
        stage.gradient_checkpointing = job.gradient_checkpointing
        if plan_job.quant is not None:
            quantize_decoder_linears(stage, plan_job.quant)
    ft = FinetuningArguments(
        finetuning_type=job.finetuning_type,
        lora_target=",".join(job.lora_targets),
        lora_rank=job.lora_rank,
        num_layer_trainable=job.num_layer_trainable,
        name_module_trainable=job.name_module_trainable,
    )
    prepare_trainable(stages, ft, trained_dtype=precision.trained_dtype)
    settings = TrainingArguments(
        learning_rate=1e-4,
        weight_decay=0.01,
        optim=job.optim,
        offload_optimizer=job.offload_optimizer,
        optimizer_in_bwd=job.optimizer_in_bwd,
    )
    optimizer, _ = build_optimizer(stages, settings, steps=1, stochastic_rounding=plan_job.stochastic_rounding)
    if isinstance(optimizer, torch.optim.AdamW) and isinstance(next(model.parameters()), FakeTensor):
        # torch picks AdamW's foreach path for Parameters on an accelerator (emu included) but
        # not for fake ones; take the path the real chips take.
        for group in optimizer.param_groups:
            group["foreach"] = True
    stepper = StepInBackward(optimizer, ChipsRunner(model, 1, contextlib.nullcontext)) if job.optimizer_in_bwd else None
    return model, optimizer, Precision(precision), stepper


def train_step(
    model: SpannedModel,
    optimizer,
    precision: Precision,
    job: Job,
    tracker: Tracker | None,
    use_scaler: bool,
    stepper: StepInBackward | None = None,
) -> None:
    """One optimizer step as ``chipspan.train.step.TrainStep`` runs it (``stepper``: the weights
    step in backward, a tied embedding's copies after it), with ``micro_batches_in_flight``
    forwards kept alive before a single backward (m = 1: the step exactly)."""
    scaled = use_scaler and precision.scaler is not None
    runner = ChipsRunner(model, micro_batches=1, autocast=precision.autocast)
    device = model.placement.devices[0]

    def phase(name):
        if tracker is not None:
            tracker.phase = name

    model.train()
    phase("forward")
    losses = []
    for _ in range(job.micro_batches_in_flight):
        ids = torch.zeros(job.batch, job.seq_len, dtype=torch.long, device=device)
        with precision.autocast():
            losses.append(model(ids, ids) / job.micro_batches_in_flight)
    loss = sum(losses[1:], losses[0])
    del losses
    phase("backward")
    (loss * precision.loss_scale if scaled else loss).backward()
    del loss
    phase("step")
    if stepper is not None:
        runner.join_tied_gradients()
        stepper.finish_step()
        phase("idle")
        return
    overflowed = scaled and precision.unscale(runner.gradients(), runner.any_rank)
    runner.clip_gradients(1.0)
    if not overflowed:
        optimizer.step()
    if scaled:
        precision.update(overflowed)
    optimizer.zero_grad(set_to_none=True)
    settle(optimizer)
    phase("idle")


@dataclass
class ChipResult:
    layers: range
    predicted: int
    measured: int  # emu's statistic (emu mode) or the tracker's (fake mode)
    tracked: int  # the tracker's peak
    by_phase: dict  # the tracker's peak per phase

    @property
    def ratio(self) -> float:
        return self.predicted / self.measured


def measure(
    config: ModelConfig, split: list[int], job: Job, mode: str = "fake", steps: int = 2, track: bool = True
) -> list[ChipResult]:
    """Run ``steps`` training steps over ``len(split)`` chips; each chip's peak over the last step
    against the prediction. ``mode``: "fake" or "emu"."""
    from chipspan import emu

    # never fewer chips than already enabled: chips that held tensors cannot be removed
    emu.enable(num_chips=max(len(split), emu.device_module.device_count() if emu.is_available() and emu._ext else 1))
    devices = [torch.device("emu", i) for i in range(len(split))]
    tracker = (
        Tracker(fake=mode == "fake", true_count=job.batch * (job.seq_len - 1)) if track or mode == "fake" else None
    )
    if mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        outer = FakeTensorMode()
        # The converter's memo keeps weak references to fake parameters, which stops
        # ``Module.to`` (it swaps fake parameters) from moving LoRA's freshly built adapters.
        outer.fake_tensor_converter.meta_converter.tensor_memo = tracker.memo = _ShortMemo()
    elif mode == "emu":
        outer = contextlib.nullcontext()
    else:
        raise ValueError(f"mode must be fake or emu, not {mode!r}")
    with outer, tracker if tracker is not None else contextlib.nullcontext():
        model, optimizer, precision, stepper = build(config, split, job, devices)
        for step in range(steps):
            if step == steps - 1:
                if tracker is not None:
                    tracker.reset_peaks()
                if mode == "emu":
                    emu.reset_peak_memory()
            train_step(model, optimizer, precision, job, tracker, use_scaler=mode == "emu", stepper=stepper)
        results = []
        layers = model.placement.layers
        for i, device in enumerate(devices):
            first, last = i == 0, i == len(split) - 1
            predicted = estimate(config, layers[i], first, last, job.plan_job()).total
            tracked = tracker.peak(device) if tracker is not None else 0
            measured = emu.peak_memory(i) if mode == "emu" else tracked
            phases = dict(tracker.peaks.get(str(device), {})) if tracker is not None else {}
            results.append(ChipResult(layers[i], predicted, measured, tracked, phases))
        del model, optimizer, stepper
    return results


class _ShortMemo(dict):
    """A plain dict in place of the converter's weak memo; ``Tracker`` empties it after every op."""


def predict(config: ModelConfig, split: list[int], job: Job) -> list[int]:
    starts = [sum(split[:i]) for i in range(len(split))]
    return [
        estimate(config, range(a, a + n), i == 0, i == len(split) - 1, job.plan_job()).total
        for i, (a, n) in enumerate(zip(starts, split))
    ]


def render(results: list[ChipResult], mode: str) -> str:
    rows = [
        f"{'chip':>4} {'layers':>7} {'predicted':>10} {'measured':>10} {'ratio':>6} {'tracker':>10}  "
        f"peak by phase (GiB: forward/backward/step)"
    ]
    for i, r in enumerate(results):
        phases = "/".join(f"{r.by_phase.get(p, 0) / GIB:.3f}" for p in PHASES)
        rows.append(
            f"{i:>4} {r.layers.start:>3}-{r.layers.stop - 1:<3} {r.predicted / GIB:10.4f} "
            f"{r.measured / GIB:10.4f} {r.ratio:6.3f} {r.tracked / GIB:10.4f}  {phases}"
        )
    rows.append(f"(GiB; measured = {'the tracker under FakeTensorMode' if mode == 'fake' else 'emu peak_memory'})")
    return "\n".join(rows)


def small_config(
    layers: int, hidden: int, vocab: int = 32000, heads: int = 4, kv_heads: int | None = None
) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": hidden * 11 // 4,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads or heads,
        }
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("fake", "emu"))
    parser.add_argument("--config", help="a config.json (default: a small random Llama, see --layers/--hidden)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--split", default="1,1", help="layers per chip, e.g. 2,2 (the first layers of the model)")
    parser.add_argument("--finetuning", default="lora", choices=("lora", "full", "freeze"))
    parser.add_argument("--lora_target", default="q_proj,v_proj")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--pure_bf16", action="store_true")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--in_flight", type=int, default=1)
    parser.add_argument("--num_layer_trainable", type=int, default=3)
    parser.add_argument("--name_module_trainable", default="mlp")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--quantization_bit", type=int, choices=(4, 8))
    parser.add_argument("--optim", default="adamw_torch", choices=("adamw_torch", "adamw_8bit"))
    parser.add_argument("--offload_optimizer", action="store_true")
    parser.add_argument("--optimizer_in_bwd", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = ModelConfig.from_folder(args.config) if args.config else small_config(args.layers, args.hidden, args.vocab)
    split = [int(n) for n in args.split.split(",")]
    if sum(split) > config.num_hidden_layers:
        parser.error(f"--split holds {sum(split)} layers; the model has {config.num_hidden_layers}")
    if sum(split) < config.num_hidden_layers:  # measure the first layers only
        config = _truncated(config, sum(split))
    job = Job(
        finetuning_type=args.finetuning,
        half=args.fp16,
        pure_bf16=args.pure_bf16,
        seq_len=args.seq,
        batch=args.batch,
        gradient_checkpointing=args.checkpointing,
        lora_targets=tuple(args.lora_target.split(",")),
        micro_batches_in_flight=args.in_flight,
        num_layer_trainable=args.num_layer_trainable,
        name_module_trainable=args.name_module_trainable,
        quantization_bit=args.quantization_bit,
        optim=args.optim,
        offload_optimizer=args.offload_optimizer,
        optimizer_in_bwd=args.optimizer_in_bwd,
    )
    results = measure(config, split, job, args.mode, steps=args.steps)
    print(
        f"{args.mode}: {args.finetuning}{' fp16' if args.fp16 else ' pure bf16' if args.pure_bf16 else ' fp32'}, seq {args.seq}, batch {args.batch}"
        f"{', checkpointing' if args.checkpointing else ''}{f', {args.in_flight} in flight' if args.in_flight > 1 else ''},"
        f" h={config.hidden_size}, split {split}"
    )
    print(render(results, args.mode))
    return 0


def _truncated(config: ModelConfig, layers: int) -> ModelConfig:
    """The same model shape with only its first ``layers`` decoder layers."""
    return dataclasses.replace(config, num_hidden_layers=layers)


if __name__ == "__main__":
    sys.exit(main())
