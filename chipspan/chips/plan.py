"""`chipspan plan`: what a training job needs on each chip, from ``config.json`` alone.

Takes `train`'s flags. With ``--chip_memory`` it also finds the fewest chips that hold the job
(``--chips auto``) and says whether the chips asked for are enough. Nothing is loaded but the
config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from chipspan.args import RunArguments
from chipspan.chips.memory import GIB, ChipMemory, balanced_split, estimate, min_chips
from chipspan.devices import parse_chip_ids
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
    """The memory model's knobs for a run's settings."""
    ft, train = run.finetuning, run.training
    targets = tuple(t.strip() for t in (ft.lora_target or "q_proj,v_proj").split(",") if t.strip())
    return dict(finetuning_type=ft.finetuning_type, base_dtype_bytes=2 if (train.fp16 or train.bf16) else 4,
                seq_len=run.data.cutoff_len, batch=train.per_device_train_batch_size,
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
        count = len(parse_chip_ids(run.chips.chips))
    if count > config.num_hidden_layers:
        raise ChipspanError(f"{count} chips asked for but the model has only {config.num_hidden_layers} layers")
    layers = balanced_split(config, count, **job)
    chips = [estimate(config, r, i == 0, i == count - 1, **job) for i, r in enumerate(layers)]
    return Plan(run.model.model_name_or_path, chip_bytes, fewest, chips)


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
