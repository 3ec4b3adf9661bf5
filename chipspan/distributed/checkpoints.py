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
tokenizer, ``scheduler.pt``, ``rng_state.pth`` and ``trainer_state.json`` (under ``--save_only_model``
the weights, the tokenizer and the trainer state only, no optimizer file); then it flushes the
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

import torch
import torch.distributed as dist

from chipspan import manifest
from chipspan.adapters.peft_io import adapter_state_dict
from chipspan.distributed.mesh import Layout
from chipspan.models.decoder import CausalLM
from chipspan.models.weights import SAFETENSORS_INDEX, model_state_dict, remove_weights, write_safetensors
from chipspan.train import checkpoints
from chipspan.train.reporting import TrainerState


def save_checkpoint(
    files: checkpoints.RunFiles,
    step: int,
    pieces: list[CausalLM],
    layout: Layout,
    optimizer,
    scheduler,
    state: TrainerState,
    precision_state: dict | None = None,
) -> Path | None:
    """``checkpoint-{step}`` in ``files.output_dir``, every rank taking part (see the module's
    docstring); ``precision_state``: the fp16 loss scaler's (``scaler.pt``), the same on every rank.
    Returns the folder on rank 0, None elsewhere."""
    first, output_dir = layout.rank == 0, files.output_dir
    tmp = checkpoints.start_checkpoint(output_dir, step) if first else checkpoints.temporary_folder(output_dir, step)
    hashed = write_weights(pieces, layout, tmp, files.base_model, files.is_lora)  # its barrier orders the cleanup first
    writes_share = layout.replica == 0 and not files.save_only_model
    mine = _write_optimizer_share(pieces, optimizer, scheduler, layout, tmp) if writes_share else None
    shares = _on_rank_zero(mine)  # also: every stage's files are written
    if not first:
        return None
    checkpoints.save_run_state(files, tmp, _scheduler_state(shares), state, precision_state)
    known = {**hashed, **{name: entry for share in shares for name, entry in share["files"].items()}}
    return checkpoints.finish_checkpoint(tmp, output_dir, step, files.settings, known)


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
        write_safetensors(tensors, folder / shard)
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


def _write_optimizer_share(pieces: list[CausalLM], optimizer, scheduler, layout: Layout, folder: Path) -> dict:
    """``optimizer-stage{k}-of-{n}.pt`` (empty where nothing trains, so the set is complete); returns
    what rank 0 needs for scheduler.pt and the manifest: the group kinds, the scheduler's state and
    the file's manifest entry."""
    saved, schedule = {"state": {}, "param_groups": [], "kinds": []}, None
    if optimizer is not None:
        saved = checkpoints.optimizer_state_by_name(pieces, optimizer)
        schedule = scheduler.state_dict()
    file = folder / f"optimizer-stage{layout.stage_rank}-of-{layout.pipeline}.pt"
    torch.save(saved, file)
    checkpoints.fsync(file)
    return {"kinds": saved["kinds"], "scheduler": schedule, "files": {file.name: manifest.file_entry(file)}}


def _scheduler_state(shares: list[dict]) -> dict | None:
    """scheduler.pt of the whole model: any stage's (they step alike), one entry per group kind present."""
    kinds = {kind for share in shares for kind in share["kinds"]}
    schedule = next((share["scheduler"] for share in shares if share["scheduler"] is not None), None)
    return checkpoints.resize_scheduler(schedule, len(kinds))


def _on_rank_zero(mine) -> list | None:
    """The non-None objects of every rank, in rank order, on global rank 0; None elsewhere."""
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return [g for g in gathered if g is not None] if gathered is not None else None


class RankWriter:
    """How a torchrun rank's stages reach the disk (``chipspan.train.training``'s writer): every
    rank writes its share of a checkpoint, rank 0 the logs, results and the rest."""

    def __init__(self, stages: list[CausalLM], layout: Layout, device: torch.device, files: checkpoints.RunFiles):
        self.stages, self.layout, self.device, self.files = stages, layout, device, files
        self.writes_outputs = layout.writes_outputs

    def agree_nonfinite(self, name: str | None) -> str | None:
        """Every rank agrees: one rank's inf/NaN weight stops them all before anything is written."""
        flag = torch.tensor(float(name is not None), device=self.device)
        dist.all_reduce(flag)
        return name or ("of another stage" if float(flag) else None)

    def checkpoint(self, step: int, optimizer, scheduler, state: TrainerState, precision_state: dict | None):
        return save_checkpoint(self.files, step, self.stages, self.layout, optimizer, scheduler, state, precision_state)

    def final_weights(self) -> None:
        files = self.files
        write_weights(self.stages, self.layout, files.output_dir, files.base_model, files.is_lora)

    def barrier(self) -> None:
        dist.barrier()
