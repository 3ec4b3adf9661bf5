"""`chipspan plan --suggest`: the plan the other way round — which memory savers make a job fit its
chips (``--chips N``), cheapest first; with ``--chips auto``, how few chips each combination needs.

Every combination of the savers that apply to the job (at most one of each kind: recomputation,
the frozen base's bits, the precision, where AdamW keeps its state, when it steps) is priced by the same plan
``chipspan plan`` shows. A combination is left out when a part of it alone already holds the
fullest chip as low (the rest would cost without saving), and where it does not fit. Each saver
has a cost rank (what it gives up: step time, then numerics; docs/plan.md, "The savers"); a
combination costs the sum of its savers' ranks.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace

from chipspan.args import RunArguments
from chipspan.chips.plan import Plan, make_plan, size_text
from chipspan.errors import ChipspanError


@dataclass(frozen=True)
class Saver:
    flag: str  # what the command line gains, e.g. "--optim adamw_8bit"
    kind: str  # savers of one kind exclude each other
    cost: int  # rank of what it gives up; lower is cheaper
    gives_up: str  # in words
    applies: Callable[[RunArguments], bool]  # whether it changes this run
    apply: Callable[[RunArguments], RunArguments]
    drops: Callable[[RunArguments], tuple[str, ...]] = lambda run: ()  # flags of the run it replaces


def _set(group: str, **values) -> Callable[[RunArguments], RunArguments]:
    """A run with ``values`` set in its argument ``group`` (e.g. "training")."""
    return lambda run: replace(run, **{group: replace(getattr(run, group), **values)})


def _no_precision_flag(run: RunArguments) -> bool:
    return not (run.training.fp16 or run.training.bf16 or run.finetuning.pure_bf16)


def _half_precision_flags(run: RunArguments) -> tuple[str, ...]:
    """--fp16 or --bf16 where the run sets it (--pure_bf16 takes its place)."""
    return tuple(flag for flag, on in (("--fp16", run.training.fp16), ("--bf16", run.training.bf16)) if on)


def _trains_base(run: RunArguments) -> bool:
    return run.finetuning.finetuning_type in ("full", "freeze")


SAVERS = (
    Saver(
        "--disable_gradient_checkpointing false",
        "recompute",
        1,
        "each layer's forward runs again in backward (more step time), same numbers",
        lambda run: run.training.disable_gradient_checkpointing,
        _set("training", disable_gradient_checkpointing=False),
    ),
    Saver(
        "--bf16",
        "precision",
        2,
        "16-bit frozen weights and activations (autocast), bf16 rounding",
        _no_precision_flag,
        _set("training", bf16=True),
    ),
    Saver(
        "--quantization_bit 8",
        "base",
        3,
        "int8 frozen base, dequantized block by block (more step time), the loss almost unchanged",
        lambda run: run.finetuning.finetuning_type == "lora" and run.model.quantization_bit is None,
        _set("model", quantization_bit=8),
    ),
    Saver(
        "--optim adamw_8bit",
        "optimizer",
        3,
        "AdamW's moments kept in 8 bits per block",
        lambda run: _trains_base(run) and run.training.optim != "adamw_8bit" and not run.training.offload_optimizer,
        _set("training", optim="adamw_8bit"),
    ),
    Saver(
        "--offload_optimizer",
        "optimizer",
        4,
        "fp32 master weights and moments in host memory, stepped there (host memory, step time)",
        lambda run: _trains_base(run) and not run.training.offload_optimizer,
        _set("training", offload_optimizer=True, optim="adamw_torch"),
    ),
    Saver(
        "--optimizer_in_bwd --max_grad_norm 0",
        "stepping",
        4,
        "each weight steps inside backward, so no clipping by the global norm (and no accumulation)",
        lambda run: _trains_base(run) and not run.training.optimizer_in_bwd,
        _set("training", optimizer_in_bwd=True, max_grad_norm=0.0),
    ),
    Saver(
        "--pure_bf16",
        "precision",
        5,
        "bf16 trained weights, updates rounded at random (the loss moves a little)",
        lambda run: _trains_base(run) and not run.finetuning.pure_bf16,
        lambda run: _set("finetuning", pure_bf16=True)(_set("training", fp16=False, bf16=False)(run)),
        _half_precision_flags,
    ),
    Saver(
        "--quantization_bit 4",
        "base",
        6,
        "NF4 frozen base: more step time, and a measurably higher loss on small models",
        lambda run: run.finetuning.finetuning_type == "lora" and run.model.quantization_bit != 4,
        _set("model", quantization_bit=4),
    ),
)


@dataclass(frozen=True)
class Priced:
    """One combination of savers (none: the job as it is) and its plan."""

    savers: tuple[Saver, ...]
    plan: Plan
    drops: tuple[str, ...] = ()  # flags of the job's command line the savers replace

    @property
    def cost(self) -> int:
        return sum(saver.cost for saver in self.savers)

    @property
    def fullest(self) -> int:
        """Bytes: the fullest chip's predicted peak."""
        return max(self.plan.chip_totals)


def suggest(run: RunArguments) -> tuple[Priced, list[Priced]]:
    """The job as it is, and the combinations of savers that hold it on its chips (none when it fits
    as it is; every one that saves something under --chips auto), cheapest first (then fewer
    savers, then the lower peak)."""
    if run.chips.chip_memory is None:
        raise ChipspanError("--suggest needs --chip_memory, the memory of one chip (e.g. 14GiB)")
    as_is = Priced((), make_plan(run))
    auto = run.chips.chips == "auto"
    if as_is.plan.fits and not auto:
        return as_is, []
    priced = {(): as_is}
    applicable = [saver for saver in SAVERS if saver.applies(run)]
    kinds = sorted({saver.kind for saver in applicable})
    options = [[None, *(s for s in applicable if s.kind == kind)] for kind in kinds]
    for choice in itertools.product(*options):
        savers = tuple(sorted((s for s in choice if s is not None), key=lambda s: s.cost))
        if not savers:
            continue
        changed = run
        for saver in savers:
            changed = saver.apply(changed)
        try:
            drops = tuple(sorted({flag for saver in savers for flag in saver.drops(run)}))
            priced[savers] = Priced(savers, make_plan(changed), drops)
        except ChipspanError:
            continue  # savers this job refuses together (docs name why)
    kept = [
        combo for key, combo in priced.items() if key and (auto or combo.plan.fits) and not _needless(combo, priced)
    ]
    return as_is, sorted(kept, key=lambda combo: (combo.cost, len(combo.savers), combo.fullest))


def _needless(combo: Priced, priced: dict[tuple[Saver, ...], Priced]) -> bool:
    """Whether a part of ``combo``'s savers (or none) already holds the fullest chip as low, with no
    more chips and no more host memory."""
    for size in range(len(combo.savers)):
        for part in itertools.combinations(combo.savers, size):
            other = priced.get(part)
            if (
                other is not None
                and other.fullest <= combo.fullest
                and other.plan.host_bytes <= combo.plan.host_bytes
                and other.plan.min_chips <= combo.plan.min_chips
            ):
                return True
    return False


def render(as_is: Priced, kept: list[Priced], auto: bool) -> str:
    """The job as it is, then one line per combination of savers, cheapest first."""
    plan = as_is.plan
    chips = plan.num_chips
    where = f"{plan.min_chips} chip(s)" if auto else f"{chips} chip(s)"
    verdict = "" if auto else ("fits" if plan.fits else "does NOT fit") + ", "
    rows = [
        f"as it is: fullest chip {size_text(as_is.fullest)} on {where} of {size_text(plan.chip_bytes)} usable "
        f"({verdict}fewest chips {plan.min_chips})"
    ]
    if plan.fits and not auto:
        rows.append("no saver needed")
        return "\n".join(rows)
    if not kept:
        rows.append(
            f"no combination of savers holds it on {chips} chip(s): span more chips, or lower "
            "per_device_train_batch_size or cutoff_len"
        )
        return "\n".join(rows)
    rows.append(
        "savers, cheapest first, and the fewest chips each needs:"
        if auto
        else f"savers that hold it on {chips} chip(s), cheapest first:"
    )
    width = max(len(_flags(combo)) for combo in kept)
    for combo in kept:
        host = f", host {size_text(combo.plan.host_bytes)}" if combo.plan.host_bytes else ""
        rows.append(
            f"  {_flags(combo):<{width}}  fullest chip {size_text(combo.fullest)}{host}, fewest chips "
            f"{combo.plan.min_chips}; gives up: {'; '.join(s.gives_up for s in combo.savers)}"
        )
    return "\n".join(rows)


def _flags(combo: Priced) -> str:
    dropped = f" (drop {' '.join(combo.drops)})" if combo.drops else ""
    return " ".join(saver.flag for saver in combo.savers) + dropped


def to_json(as_is: Priced, kept: list[Priced]) -> str:
    def entry(combo: Priced) -> dict:
        return {
            "flags": [saver.flag for saver in combo.savers],
            "drop": list(combo.drops),
            "cost": combo.cost,
            "fullest_chip_bytes": combo.fullest,
            "host_bytes": combo.plan.host_bytes,
            "fits": combo.plan.fits,
            "min_chips": combo.plan.min_chips,
        }

    return json.dumps({"as_is": entry(as_is), "suggestions": [entry(combo) for combo in kept]}, indent=2)
