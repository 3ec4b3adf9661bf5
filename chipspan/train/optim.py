"""AdamW and its learning-rate schedule over the trained parameters of some stages, as the Hugging
Face Trainer builds them: no weight decay on biases and norm weights."""

from __future__ import annotations

import torch

from chipspan.args import TrainingArguments
from chipspan.models.decoder import CausalLM
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
    stages: list[CausalLM], args: TrainingArguments, steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR] | tuple[None, None]:
    """AdamW over the trained parameters of ``stages`` (groups as ``KINDS``, the empty one left out)
    and its schedule over ``steps`` optimizer steps; (None, None) when nothing of them trains."""
    groups: dict[str, list] = {kind: [] for kind in KINDS}
    seen: set[int] = set()
    for stage in stages:
        for name, param in stage.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                groups[kind_of(name)].append(param)
    decay = {"decay": args.weight_decay, "no_decay": 0.0}
    present = [{"params": params, "weight_decay": decay[kind]} for kind, params in groups.items() if params]
    if not present:
        return None, None
    optimizer = torch.optim.AdamW(
        present, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )
    warmup = warmup_steps_for(steps, args.warmup_steps, args.warmup_ratio)
    return optimizer, build_scheduler(optimizer, args.lr_scheduler_type, steps, warmup)


def group_kind(group: dict, names: dict[int, str]) -> str:
    """The kind of an optimizer parameter group, from its first parameter's name."""
    return kind_of(names[id(group["params"][0])]) if group["params"] else "decay"
