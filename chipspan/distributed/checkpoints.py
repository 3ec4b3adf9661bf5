"""Checkpoints of a pipeline run, in the very files a single-process run writes.

Each stage's trained tensors (adapter or model weights) and its AdamW state, keyed by parameter
name, are gathered on global rank 0, which writes one ``checkpoint-N/`` exactly as
``chipspan.train.checkpoints.save_checkpoint`` lays it out (HF safetensors or a PEFT adapter,
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json``), through a hidden
temporary folder renamed once complete. Such a checkpoint loads into any placement: one process,
N chips in one process, or any number of pipeline stages here — each stage reads the weights and
optimizer entries of the parameters it holds.

AdamW's parameter groups are the single-process ones, [weight decay, no weight decay], each present
when some stage has parameters of that kind; a stage's own groups are matched to them by kind.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from chipspan.adapters.peft_io import adapter_state_dict
from chipspan.models.checkpoint import model_state_dict
from chipspan.models.decoder import CausalLM
from chipspan.models.tokenizer import Tokenizer
from chipspan.train import checkpoints
from chipspan.train.reporting import TrainerState

KINDS = ("decay", "no_decay")  # the order recipe's AdamW lists its groups in


def gather_trained_state(pieces: list[CausalLM], optimizer, scheduler, is_lora: bool,
                         contributes: bool) -> list[dict] | None:
    """Every stage's tensors and optimizer state on global rank 0 (a list, one entry per rank); None elsewhere.

    ``contributes``: whether this rank sends (the first data-parallel replica does; the others hold copies).
    """
    mine = None
    if contributes:
        tensors = {}
        for piece in pieces:
            tensors.update({k: v.detach().cpu() for k, v in
                            (adapter_state_dict(piece) if is_lora else model_state_dict(piece)).items()})
        mine = {"tensors": tensors}
        if optimizer is not None:
            view = SimpleNamespace(stages=pieces)
            mine["optimizer"] = checkpoints.optimizer_state_by_name(view, optimizer)
            mine["kinds"] = [_group_kind(pieces, group) for group in optimizer.param_groups]
            mine["scheduler"] = scheduler.state_dict()
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return [g for g in gathered if g is not None] if gathered is not None else None


def write_checkpoint(parts: list[dict], first_piece: CausalLM, output_dir: Path, step: int, tokenizer: Tokenizer,
                     state: TrainerState, base_model: str, is_lora: bool) -> Path:
    """``checkpoint-{step}`` from the gathered parts, written on rank 0 through a temporary folder."""
    tmp = checkpoints.start_checkpoint(output_dir, step)
    write_weights(parts, first_piece, tmp, base_model, is_lora)
    tokenizer.save(tmp)
    optimizer_state, scheduler_state = merge_optimizer_states(parts)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler_state, tmp / "scheduler.pt")
    torch.save(checkpoints.rng_state(), tmp / "rng_state.pth")
    state.save(tmp)
    return checkpoints.finish_checkpoint(tmp, output_dir, step)


def write_weights(parts: list[dict], first_piece: CausalLM, folder: Path, base_model: str, is_lora: bool) -> None:
    """The adapter (PEFT) or the whole model (HF safetensors + config.json) from the gathered parts."""
    tensors = {k: v for part in parts for k, v in part["tensors"].items()}
    checkpoints.write_trained_weights(tensors, first_piece, folder, base_model, is_lora)


def merge_optimizer_states(parts: list[dict]) -> tuple[dict, dict]:
    """(optimizer.pt, scheduler.pt) of the whole model from the stages' parts."""
    state, groups, scheduler = {}, {}, None
    for part in parts:
        if "optimizer" not in part:
            continue  # nothing trains on that stage
        state.update(part["optimizer"]["state"])
        for kind, group in zip(part["kinds"], part["optimizer"]["param_groups"]):
            groups.setdefault(kind, group)
        scheduler = scheduler or part["scheduler"]
    ordered = [groups[kind] for kind in KINDS if kind in groups]
    return {"state": state, "param_groups": ordered}, _resize_scheduler(scheduler, len(ordered))


def load_stage_optimizer(pieces: list[CausalLM], optimizer, scheduler, folder: Path) -> None:
    """This rank's share of a checkpoint's optimizer.pt and scheduler.pt (written by any placement)."""
    saved = torch.load(folder / "optimizer.pt", weights_only=False)
    names = _parameter_names(pieces)
    by_kind = dict(zip(KINDS, saved["param_groups"])) if len(saved["param_groups"]) == len(KINDS) else None
    for group in optimizer.param_groups:
        saved_group = by_kind[_group_kind(pieces, group)] if by_kind else saved["param_groups"][0]
        checkpoints.load_group_state(optimizer, group, saved_group, saved["state"], names)
    schedule = torch.load(folder / "scheduler.pt", weights_only=False)
    scheduler.load_state_dict(_resize_scheduler(schedule, len(optimizer.param_groups)))


def _resize_scheduler(schedule: dict | None, groups: int) -> dict | None:
    """A LambdaLR state for ``groups`` parameter groups (every group has the same learning rate)."""
    if schedule is None:
        return None
    resized = dict(schedule)
    for key in ("base_lrs", "_last_lr"):
        if resized.get(key):
            resized[key] = [resized[key][0]] * groups
    return resized


def _group_kind(pieces: list[CausalLM], group: dict) -> str:
    """"no_decay" for a group of biases and norm weights (recipe's AdamW rule), else "decay"."""
    name = _parameter_names(pieces)[id(group["params"][0])] if group["params"] else ""
    return "no_decay" if name.endswith("bias") or "norm" in name else "decay"


def _parameter_names(pieces: list[CausalLM]) -> dict[int, str]:
    names: dict[int, str] = {}
    for piece in pieces:
        for name, param in piece.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), name)
    return names
