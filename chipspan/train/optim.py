"""AdamW and its learning-rate schedule over the trained parameters of some stages, as the Hugging
Face Trainer builds them: no weight decay on biases and norm weights.

Which AdamW (one update rule, three ways to keep its state):

- ``--optim adamw_torch``: torch.optim.AdamW, moments in the trained weights' dtype on their chip;
  with 16-bit trained weights (--pure_bf16) and --stochastic_rounding, chipspan's AdamW instead,
  which rounds each new weight at random so updates below a bf16 step still count;
- ``--optim adamw_8bit``: chipspan's AdamW with block-wise 8-bit moments (``chipspan.optim.adamw``);
- ``--offload_optimizer``: fp32 master weights and moments in host memory, stepped there while
  the chips go on (``chipspan.optim.offload``).

``--optimizer_in_bwd`` steps each weight inside backward with chipspan's AdamW (whose
per-parameter step it needs; its state is torch's AdamW's, so checkpoints are the same).
"""

from __future__ import annotations

import torch

from chipspan.args import TrainingArguments
from chipspan.models.decoder import CausalLM
from chipspan.optim import adamw
from chipspan.optim.offload import HOST_TENSORS, HostOffloadedAdamW
from chipspan.train.schedule import build_scheduler, warmup_steps_for

KINDS = ("decay", "no_decay")  # AdamW's parameter groups, in the order build_optimizer lists them


def kind_of(name: str) -> str:
    """The parameter group of parameter ``name``: "no_decay" for biases and norm weights."""
    return "no_decay" if name.endswith("bias") or "norm" in name else "decay"


def parameter_names(stages: list[CausalLM]) -> dict[int, str]:
    """Each parameter's name in the whole model (its first name, for a tied one), by id."""
    names: dict[int, str] = {}
    for stage in stages:
        for name, param in stage.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), name)
    return names


def build_optimizer(
    stages: list[CausalLM], args: TrainingArguments, steps: int, stochastic_rounding: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR] | tuple[None, None]:
    """The AdamW ``args`` choose (see the module notes) over the trained parameters of ``stages``
    (groups as ``KINDS``, the empty one left out) and its schedule over ``steps`` optimizer steps;
    (None, None) when nothing of them trains. ``stochastic_rounding``: round the updates of 16-bit
    trained weights at random (``chipspan.chips.job.rounds_stochastically`` says when)."""
    groups: dict[str, list] = {kind: [] for kind in KINDS}
    seen: set[int] = set()
    for stage in stages:
        for name, param in stage.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                groups[kind_of(name)].append((name, param))
    decay = {"decay": args.weight_decay, "no_decay": 0.0}
    present = [(kind, named, decay[kind]) for kind, named in groups.items() if named]
    if not present:
        return None, None
    settings = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if args.offload_optimizer:
        optimizer = HostOffloadedAdamW(_unnamed(present), **settings, modules=stages)
    elif args.optim == "adamw_8bit" or stochastic_rounding or args.optimizer_in_bwd:
        named = [{"params": params, "weight_decay": wd} for _, params, wd in present]  # names seed the rounding
        optimizer = adamw.AdamW(
            named, **settings, state_bits=args.moment_bits, stochastic_rounding=stochastic_rounding, seed=args.seed
        )
    else:
        optimizer = torch.optim.AdamW(_unnamed(present), **settings)
    warmup = warmup_steps_for(steps, args.warmup_steps, args.warmup_ratio)
    return optimizer, build_scheduler(optimizer, args.lr_scheduler_type, steps, warmup)


def saved_state_bytes(args: TrainingArguments, numel: int, dtype_bytes: int) -> int:
    """Bytes the chosen AdamW's state of ``numel`` trained elements of ``dtype_bytes`` each takes in a
    checkpoint: two moments (8-bit with --optim adamw_8bit), or fp32 master and moments (offloaded)."""
    if args.offload_optimizer:
        return 4 * len(HOST_TENSORS) * numel
    return adamw.state_bytes_of(numel, args.moment_bits, dtype_bytes)


def settle(optimizer: torch.optim.Optimizer | None) -> None:
    """Wait until every update ``optimizer`` started is on its chip: call before reading weights
    (checkpoints, the final save). Only HostOffloadedAdamW steps in the background."""
    if isinstance(optimizer, HostOffloadedAdamW):
        optimizer.synchronize()


def _unnamed(present: list[tuple[str, list, float]]) -> list[dict]:
    """torch's parameter groups of (kind, (name, param) pairs, weight decay) entries."""
    return [{"params": [p for _, p in named], "weight_decay": wd} for _, named, wd in present]


def group_kind(group: dict, names: dict[int, str]) -> str:
    """The kind of an optimizer parameter group, from its first parameter's name."""
    return kind_of(names[id(group["params"][0])]) if group["params"] else "decay"
