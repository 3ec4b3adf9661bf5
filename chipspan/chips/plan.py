"""`chipspan plan`: what a training job needs on each chip, from ``config.json`` alone; and the
chips and layer split `train` uses.

Takes `train`'s flags. With ``--chip_memory`` it also finds the fewest chips that hold the job
(``--chips auto``) and says whether the chips asked for are enough. Nothing is loaded but the
config.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

from chipspan import devices
from chipspan.args import RunArguments
from chipspan.chips.memory import GIB, ChipMemory, balanced_split, estimate, min_chips
from chipspan.chips.placement import split_layers
from chipspan.errors import ChipspanError
from chipspan.models.checkpoint import parse_size
from chipspan.models.config import ModelConfig


@dataclass
class Plan:
    model: str
    chip_bytes: int | None  # usable memory per chip; None when not given
    min_chips: int | None  # fewest chips that hold the job; None without chip_bytes
    chips: list[ChipMemory]  # per chip, for the chips asked for (or min_chips with --chips auto)

    @property
    def fits(self) -> bool | None:
        if self.chip_bytes is None:
            return None
        return all(chip.total <= self.chip_bytes for chip in self.chips)


def job_of(run: RunArguments) -> dict:
    """The memory model's knobs for a run's settings. Under ``--micro_batches M`` a micro-batch
    holds ceil(batch / M) examples and a chip keeps all M in flight (GPipe); ChipspanError when M
    does not fit the batch."""
    ft, train = run.finetuning, run.training
    batch, micro = train.per_device_train_batch_size, train.micro_batches
    if not 1 <= micro <= max(batch, 1):
        raise ChipspanError(f"--micro_batches {micro} must be between 1 and per_device_train_batch_size ({batch}): "
                            "each micro-batch needs at least one example")
    targets = tuple(t.strip() for t in (ft.lora_target or "q_proj,v_proj").split(",") if t.strip())
    return dict(finetuning_type=ft.finetuning_type, base_dtype_bytes=2 if (train.fp16 or train.bf16) else 4,
                seq_len=run.data.cutoff_len, batch=math.ceil(batch / micro), micro_batches_in_flight=micro,
                gradient_checkpointing=not train.disable_gradient_checkpointing, lora_rank=ft.lora_rank,
                lora_targets=targets, num_layer_trainable=ft.num_layer_trainable,
                name_module_trainable=ft.name_module_trainable)


def make_plan(run: RunArguments) -> Plan:
    if not run.model.model_name_or_path:
        raise ChipspanError("--model_name_or_path is required: a model folder or its config.json")
    config = ModelConfig.from_folder(run.model.model_name_or_path)
    job = job_of(run)
    chip_bytes = None
    if run.chips.chip_memory is not None:
        chip_bytes = int(parse_size(run.chips.chip_memory) * run.chips.usable_fraction)
    fewest = min_chips(config, chip_bytes, **job) if chip_bytes is not None else None
    if run.chips.chips == "auto":
        if fewest is None:
            raise ChipspanError("--chips auto needs --chip_memory, the memory of one chip (e.g. 16GiB)")
        count = fewest
    else:
        count = len(devices.parse_chip_ids(run.chips.chips))
    if count > config.num_hidden_layers:
        raise ChipspanError(f"{count} chips asked for but the model has only {config.num_hidden_layers} layers")
    layers = balanced_split(config, count, **job)
    chips = [estimate(config, r, i == 0, i == count - 1, **job) for i, r in enumerate(layers)]
    return Plan(run.model.model_name_or_path, chip_bytes, fewest, chips)


def train_chips(run: RunArguments, config: ModelConfig, device_type: str
                ) -> tuple[list[int], list[range], int | None]:
    """Where `train` puts the model, before any weight loads: (chip ids, each chip's decoder
    layers, the bytes of one chip or None where unknown).

    A chip's memory is --chip_memory on emulated chips, else what the first chip reports (taken
    for all); the plan may use ``usable_fraction`` of it. Known, the layers follow
    ``balanced_split``, a split the plan says will overflow is refused, and ``--chips auto`` takes
    the fewest chips that hold the job. Unknown (the CPU), the layers are split evenly and
    ``--chips auto`` is refused.
    """
    job = job_of(run)
    auto = run.chips.chips == "auto"
    chip_ids = None if auto else devices.parse_chip_ids(run.chips.chips)
    if not auto and len(chip_ids) > config.num_hidden_layers:
        raise ChipspanError(f"{len(chip_ids)} chips asked for (SOPHGO_SPLIT / --chips) but the model has only "
                            f"{config.num_hidden_layers} decoder layers; use at most {config.num_hidden_layers}")
    chip_bytes = _chip_memory(run, device_type, chip_ids[0] if chip_ids else 0)
    if chip_bytes is None:
        if auto:
            raise ChipspanError(_auto_needs_memory(device_type))
        return chip_ids, list(split_layers(config.num_hidden_layers, len(chip_ids))), None
    usable = int(chip_bytes * run.chips.usable_fraction)
    if auto:
        chip_ids = list(range(min_chips(config, usable, **job)))
        _check_chips_exist(device_type, len(chip_ids), usable)
    layers = balanced_split(config, len(chip_ids), **job)
    _check_fits(config, job, layers, usable, device_type, chip_ids)
    return chip_ids, layers, chip_bytes


def _auto_needs_memory(device_type: str) -> str:
    if device_type == "emu":
        return "--chips auto on emulated chips needs --chip_memory, the memory of one chip (e.g. 16GiB)"
    rehearse = ", or rehearse on emulated chips: --device emu --chip_memory 16GiB --chips auto"
    return (f"--chips auto needs the memory of one chip, and device '{device_type}' reports none: name the chips "
            f"(e.g. --chips 0-3){rehearse if device_type in devices.SINGLE_DEVICE_TYPES else ''}")


def _chip_memory(run: RunArguments, device_type: str, chip_id: int) -> int | None:
    """Total bytes of one chip: --chip_memory on emulated chips, what chip ``chip_id`` reports on
    an accelerator, None where nothing says (the CPU)."""
    if run.chips.chip_memory is not None:
        if device_type != "emu":
            raise ChipspanError("--chip_memory sets the memory of emulated chips (--device emu); "
                                f"device '{device_type}' reports its own")
        return parse_size(run.chips.chip_memory)
    if device_type == "emu" or device_type in devices.SINGLE_DEVICE_TYPES:
        return None
    devices.prepare_device_type(device_type)  # the plugin, before asking the chip
    device = devices.chip_devices(device_type, [chip_id])[0]
    module = torch.get_device_module(device_type)
    for read in (lambda: module.get_device_properties(device).total_memory, lambda: module.mem_get_info(device)[1]):
        try:
            return int(read())
        except (AttributeError, RuntimeError, TypeError):
            continue
    return None


def _check_chips_exist(device_type: str, needed: int, usable: int) -> None:
    if device_type == "emu":  # emulated chips are made on demand
        return
    available = devices.device_count(device_type)
    if needed > available:
        raise ChipspanError(f"--chips auto: this job needs {needed} chips of {_size(usable)} usable, but this "
                            f"machine shows {available} '{device_type}' device(s)")


def _check_fits(config: ModelConfig, job: dict, layers: list[range], usable: int, device_type: str,
                chip_ids: list[int]) -> None:
    """ChipspanError naming the fullest chip when the plan says it overflows, and what would fit."""
    totals = _peaks(config, job, layers)
    worst = max(range(len(totals)), key=totals.__getitem__)
    if totals[worst] <= usable:
        return
    held = layers[worst]
    held = f"layers {held.start}-{held.stop - 1}" if len(held) > 1 else f"layer {held.start}"
    name = device_type if device_type in devices.SINGLE_DEVICE_TYPES else f"{device_type}:{chip_ids[worst]}"
    raise ChipspanError(f"chip {chip_ids[worst]} ({name}) would run out of memory: the plan (docs/plan.md) predicts "
                        f"a {_size(totals[worst])} peak for {held} against {_size(usable)} usable; "
                        f"{_what_fits(config, job, len(layers), usable, chip_ids[0])}")


def _what_fits(config: ModelConfig, job: dict, num_chips: int, usable: int, first_chip: int) -> str:
    """What would hold the job on chips of ``usable`` bytes: more chips, or recomputation."""
    hints = []
    try:
        fewest = min_chips(config, usable, **job)
        hints.append(f"span {fewest} chips (--chips {first_chip}-{first_chip + fewest - 1})")
    except ChipspanError:
        pass  # not even one layer per chip fits
    if not job["gradient_checkpointing"]:
        recompute = dict(job, gradient_checkpointing=True)
        if max(_peaks(config, recompute, balanced_split(config, num_chips, **recompute))) <= usable:
            hints.append("drop --disable_gradient_checkpointing")
    if not hints:
        lora = "" if job["finetuning_type"] == "lora" else "LoRA, "
        return (f"lower per_device_train_batch_size or cutoff_len, or use {lora}chips with more memory "
                "(`chipspan plan` shows each chip)")
    return "it fits if you " + ", or ".join(hints)


def _peaks(config: ModelConfig, job: dict, layers: list[range]) -> list[int]:
    """Each chip's predicted peak bytes."""
    last = config.num_hidden_layers
    return [estimate(config, r, r.start == 0, r.stop == last, **job).total for r in layers]


def _size(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB else f"{num_bytes / (1 << 20):.1f} MiB"


def render(plan: Plan) -> str:
    """A table: one row per chip, GiB per kind of memory, and the verdict."""
    header = f"{'chip':>4}  {'layers':>9}  {'weights':>8}  {'grads':>8}  {'optim':>8}  {'activ':>8}  " \
             f"{'logits':>8}  {'work':>8}  {'peak':>8}  at"
    rows = [header]
    for i, chip in enumerate(plan.chips):
        span = f"{chip.layers.start}-{chip.layers.stop - 1}"
        cells = [chip.weights, chip.gradients, chip.optimizer, chip.activations, chip.logits, chip.workspace,
                 chip.total]
        rows.append(f"{i:>4}  {span:>9}  " + "  ".join(f"{c / GIB:8.2f}" for c in cells) + f"  {chip.peak_at}")
    rows.append("(GiB; peak: the predicted peak of a training step, at the moment named — the largest of "
                "its moments, not the sum of the columns; see docs/plan.md)")
    if plan.chip_bytes is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        rows.append(f"{len(plan.chips)} chip(s) of {plan.chip_bytes / GIB:.2f} GiB usable: {verdict}; "
                    f"the fewest chips that hold this job: {plan.min_chips}")
    return "\n".join(rows)


def to_json(plan: Plan) -> str:
    chips = [{**{k: v for k, v in asdict(chip).items() if k != "layers"},
              "layers": [chip.layers.start, chip.layers.stop - 1], "total": chip.total} for chip in plan.chips]
    return json.dumps({"model": plan.model, "chip_bytes": plan.chip_bytes, "min_chips": plan.min_chips,
                       "fits": plan.fits, "chips": chips}, indent=2)
