"""Checkpoints of a pipeline run: every stage writes its own share, in formats every loader reads.

Into the hidden temporary folder of ``checkpoint-N/`` (on the shared file system for runs over
several machines), the first data-parallel replica of pipeline position k of n writes

- full/freeze: ``model-0000{k+1}-of-0000{n}.safetensors``, its stage(s)' tensors (a tied head
  written once, as the embeddings): Hugging Face's sharded layout;
- ``optimizer-stage{k}-of-{n}.pt``: its AdamW state keyed by parameter name, its parameter groups
  and their kinds (weight decay or not).

Each stage hashes the files it wrote. Global rank 0 writes the rest once every stage is done:
``model.safetensors.index.json`` and ``config.json`` from the tensor names the stages report (names
and hashes only travel), or the LoRA adapter (small: gathered to rank 0, PEFT wants one file), the
tokenizer, ``scheduler.pt``, ``rng_state.pth`` and ``trainer_state.json``; then it flushes the
folder, writes the manifest (every stage's files and hashes) last, and renames the folder
(``chipspan.train.checkpoints.finish_checkpoint``). No rank ever holds more than its own stage's
weights and optimizer state.

Such a checkpoint loads into any placement — one process, N chips in one process, or any number of
pipeline stages — as does one written by a single process (``optimizer.pt``): weights are read
tensor by tensor, the optimizer files are merged by parameter name and their groups matched by kind
(``chipspan.train.checkpoints.read_optimizer_state``).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from chipspan import manifest
from chipspan.adapters.peft_io import adapter_state_dict
from chipspan.distributed.mesh import Layout
from chipspan.models.checkpoint import SAFETENSORS_INDEX, model_state_dict, remove_weights
from chipspan.models.decoder import CausalLM
from chipspan.models.tokenizer import Tokenizer
from chipspan.train import checkpoints
from chipspan.train.checkpoints import KINDS
from chipspan.train.reporting import TrainerState


def save_checkpoint(
    pieces: list[CausalLM],
    optimizer,
    scheduler,
    layout: Layout,
    output_dir: Path,
    step: int,
    tokenizer: Tokenizer,
    state: TrainerState,
    base_model: str,
    is_lora: bool,
    settings: dict,
    precision_state: dict | None = None,
) -> Path | None:
    """``checkpoint-{step}`` of a run of ``settings`` (``checkpoints.run_settings``), every rank taking
    part (see the module's docstring); ``precision_state``: the fp16 loss scaler's (``scaler.pt``), the
    same on every rank. Returns the folder on rank 0, None elsewhere."""
    first = layout.rank == 0
    tmp = checkpoints.start_checkpoint(output_dir, step) if first else checkpoints.temporary_folder(output_dir, step)
    hashed = write_weights(pieces, layout, tmp, base_model, is_lora)  # its barrier orders the cleanup first
    mine = _write_optimizer_share(pieces, optimizer, scheduler, layout, tmp) if layout.replica == 0 else None
    shares = _on_rank_zero(mine)  # also: every stage's files are written
    if not first:
        return None
    tokenizer.save(tmp)
    torch.save(_scheduler_state(shares), tmp / checkpoints.SCHEDULER_FILE)
    torch.save(checkpoints.rng_state(), tmp / checkpoints.RNG_FILE)
    state.save(tmp)
    if precision_state is not None:
        torch.save(precision_state, tmp / checkpoints.SCALER_FILE)
    known = {**hashed, **{name: entry for share in shares for name, entry in share["files"].items()}}
    return checkpoints.finish_checkpoint(tmp, output_dir, step, settings, known)


def write_weights(
    pieces: list[CausalLM], layout: Layout, folder: Path, base_model: str, is_lora: bool
) -> dict[str, dict]:
    """The trained weights into ``folder``, every rank taking part: the LoRA adapter (gathered, PEFT
    format) or the whole model (one safetensors shard per pipeline position + index + config.json).
    Returns, on rank 0, the manifest entries (``chipspan.manifest.file_entry``) of the stages' shards."""
    if layout.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if not is_lora:  # a model an earlier run wrote here in another layout
            remove_weights(folder)
    dist.barrier()
    tensors = {}
    if layout.replica == 0:
        for piece in pieces:
            tensors.update(
                {
                    k: v.detach().to("cpu").contiguous()
                    for k, v in (adapter_state_dict(piece) if is_lora else model_state_dict(piece)).items()
                }
            )
    if is_lora:
        parts = _on_rank_zero(tensors if layout.replica == 0 else None)
        if parts is not None:
            merged = {k: v for part in parts for k, v in part.items()}
            checkpoints.write_trained_weights(merged, pieces[0], folder, base_model, is_lora=True)
        return {}
    mine = None
    if layout.replica == 0:
        shard = f"model-{layout.stage_rank + 1:05d}-of-{layout.pipeline:05d}.safetensors"
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        checkpoints.fsync(folder / shard)
        mine = {
            "tensors": {name: (shard, t.numel() * t.element_size()) for name, t in tensors.items()},
            "file": (shard, manifest.file_entry(folder / shard)),
        }
    parts = _on_rank_zero(mine)
    if parts is None:
        return {}
    where = {name: entry for part in parts for name, entry in part["tensors"].items()}
    index = {
        "metadata": {"total_size": sum(size for _, size in where.values())},
        "weight_map": {name: shard for name, (shard, _) in where.items()},
    }
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    checkpoints.write_config(pieces[0], folder, next(iter(tensors.values())).dtype)
    return dict(part["file"] for part in parts)


def load_stage_optimizer(pieces: list[CausalLM], optimizer, scheduler, folder: Path) -> None:
    """This rank's share of a checkpoint's optimizer state and its scheduler (written by any placement)."""
    saved = checkpoints.read_optimizer_state(folder)
    names = _parameter_names(pieces)
    by_kind = dict(zip(KINDS, saved["param_groups"])) if len(saved["param_groups"]) == len(KINDS) else None
    for group in optimizer.param_groups:
        saved_group = by_kind[_group_kind(pieces, group)] if by_kind else saved["param_groups"][0]
        checkpoints.load_group_state(optimizer, group, saved_group, saved["state"], names)
    schedule = checkpoints.read_saved(folder / checkpoints.SCHEDULER_FILE)
    scheduler.load_state_dict(_resize_scheduler(schedule, len(optimizer.param_groups)))


def _write_optimizer_share(pieces: list[CausalLM], optimizer, scheduler, layout: Layout, folder: Path) -> dict:
    """``optimizer-stage{k}-of-{n}.pt`` (empty where nothing trains, so the set is complete); returns
    what rank 0 needs for scheduler.pt and the manifest: the group kinds, the scheduler's state and
    the file's manifest entry."""
    saved, kinds, schedule = {"state": {}, "param_groups": []}, [], None
    if optimizer is not None:
        saved = checkpoints.optimizer_state_by_name(SimpleNamespace(stages=pieces), optimizer)
        kinds = [_group_kind(pieces, group) for group in optimizer.param_groups]
        schedule = scheduler.state_dict()
    file = folder / f"optimizer-stage{layout.stage_rank}-of-{layout.pipeline}.pt"
    torch.save({**saved, "kinds": kinds}, file)
    checkpoints.fsync(file)
    return {"kinds": kinds, "scheduler": schedule, "files": {file.name: manifest.file_entry(file)}}


def _scheduler_state(shares: list[dict]) -> dict | None:
    """scheduler.pt of the whole model: any stage's (they step alike), one entry per group kind present."""
    kinds = {kind for share in shares for kind in share["kinds"]}
    schedule = next((share["scheduler"] for share in shares if share["scheduler"] is not None), None)
    return _resize_scheduler(schedule, len(kinds))


def _on_rank_zero(mine) -> list | None:
    """The non-None objects of every rank, in rank order, on global rank 0; None elsewhere."""
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return [g for g in gathered if g is not None] if gathered is not None else None


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
    """ "no_decay" for a group of biases and norm weights (recipe's AdamW rule), else "decay"."""
    name = _parameter_names(pieces)[id(group["params"][0])] if group["params"] else ""
    return "no_decay" if name.endswith("bias") or "norm" in name else "decay"


def _parameter_names(pieces: list[CausalLM]) -> dict[int, str]:
    names: dict[int, str] = {}
    for piece in pieces:
        for name, param in piece.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), name)
    return names
