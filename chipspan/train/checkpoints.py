"""``checkpoint-N/`` folders: the trained weights plus everything needed to continue the run.

A checkpoint holds the adapter (PEFT format) or the model (HF safetensors), the tokenizer files,
``optimizer.pt`` (AdamW state keyed by parameter name, so it loads into any placement; a run of
one process per stage writes ``optimizer-stage{k}-of-{n}.pt`` instead, one per pipeline position),
``scheduler.pt``, ``rng_state.pth``, ``scaler.pt`` (the fp16 loss scale) and ``trainer_state.json``.

Durability: a checkpoint is written into a hidden ``.checkpoint-N.tmp`` folder, every file and the
folder are fsynced, and only then is it renamed to ``checkpoint-N`` (and the parent fsynced). A kill
or power loss at any moment leaves the previous checkpoints intact and at worst a hidden temporary
folder, which resume never picks and the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from chipspan.adapters.peft_io import adapter_state_dict, save_adapter
from chipspan.chips.span import SpannedModel
from chipspan.errors import ChipspanError
from chipspan.models.checkpoint import model_state_dict, save_weights
from chipspan.models.decoder import CausalLM
from chipspan.models.tokenizer import Tokenizer
from chipspan.train.reporting import TrainerState

PREFIX = "checkpoint-"
OPTIMIZER_FILE = "optimizer.pt"
KINDS = ("decay", "no_decay")  # AdamW's parameter groups, in the order build_optimizer lists them
SCALER_FILE = "scaler.pt"  # fp16 loss scale and skipped-step count (as the HF Trainer names it)


def save_trained_weights(model: SpannedModel, folder: Path, base_model: str, is_lora: bool) -> None:
    """The adapter (LoRA) or the whole model (full, freeze) gathered from every chip, in HF formats."""
    tensors: dict[str, torch.Tensor] = {}
    for stage in model.stages:
        tensors.update(adapter_state_dict(stage) if is_lora else model_state_dict(stage))
    write_trained_weights(tensors, model.first, folder, base_model, is_lora)


def write_trained_weights(tensors: dict[str, torch.Tensor], first_stage: CausalLM, folder: Path,
                          base_model: str, is_lora: bool) -> None:
    """``tensors`` (every trained tensor, HF names) as a PEFT adapter, or as the whole model
    (safetensors + config.json); ``first_stage`` supplies the config and the adapter's settings."""
    folder.mkdir(parents=True, exist_ok=True)
    if is_lora:
        save_adapter(first_stage, folder, base_model, state_dict=tensors)
        return
    config = first_stage.config
    if config.tie_word_embeddings:
        tensors = {name: t for name, t in tensors.items() if name != "lm_head.weight"}
    save_weights(tensors, folder)
    write_config(first_stage, folder, next(iter(tensors.values())).dtype)


def write_config(first_stage: CausalLM, folder: Path, dtype: torch.dtype) -> None:
    """The model's config.json, naming the dtype its weights are saved in."""
    raw = dict(first_stage.config.raw)
    raw["torch_dtype"] = _dtype_name(dtype)
    (folder / "config.json").write_text(_json(raw))


def save_checkpoint(output_dir: Path, step: int, model: SpannedModel, tokenizer: Tokenizer,
                    optimizer: torch.optim.Optimizer, scheduler, state: TrainerState,
                    base_model: str, is_lora: bool, precision_state: dict | None = None) -> Path:
    tmp = start_checkpoint(output_dir, step)
    save_trained_weights(model, tmp, base_model, is_lora)
    tokenizer.save(tmp)
    torch.save(optimizer_state_by_name(model, optimizer), tmp / OPTIMIZER_FILE)
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng_state.pth")
    if precision_state is not None:
        torch.save(precision_state, tmp / SCALER_FILE)
    state.save(tmp)
    return finish_checkpoint(tmp, output_dir, step)


def start_checkpoint(output_dir: Path, step: int) -> Path:
    """The hidden temporary folder ``checkpoint-{step}`` is written into (leftovers of killed saves removed)."""
    remove_unfinished(output_dir)
    return temporary_folder(output_dir, step)


def temporary_folder(output_dir: Path, step: int) -> Path:
    return output_dir / f".{PREFIX}{step}.tmp"


def finish_checkpoint(tmp: Path, output_dir: Path, step: int) -> Path:
    """Flush ``tmp`` to the disk, then rename it to ``checkpoint-{step}``; returns that folder."""
    final = output_dir / f"{PREFIX}{step}"
    _fsync_tree(tmp)
    if final.exists():  # resumed from an earlier checkpoint: this step is written again
        replaced = final.rename(output_dir / f".{PREFIX}{step}.old")
        tmp.rename(final)
        shutil.rmtree(replaced)
    else:
        tmp.rename(final)
    fsync(output_dir)
    return final


def remove_unfinished(output_dir: Path) -> None:
    """Remove the hidden folders a killed save left behind (never a complete checkpoint)."""
    for leftover in output_dir.glob(f".{PREFIX}*"):
        if leftover.is_dir() and leftover.suffix in (".tmp", ".old"):
            shutil.rmtree(leftover)


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, then the folders themselves, to the disk."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync(path)
    fsync(folder)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_disk_space(output_dir: Path, steps: int, save_steps: int, save_total_limit: int | None,
                     checkpoint_bytes: int, final_bytes: int, report) -> None:
    """Refuse a run whose checkpoints cannot fit on the disk of ``output_dir``; warn when nearly so.

    ``checkpoint_bytes``: one checkpoint (weights + optimizer); ``final_bytes``: the final weights.
    With ``save_total_limit`` N, N + 1 checkpoints exist for a moment (the new one before the oldest goes).
    """
    saves = (steps - 1) // save_steps if save_steps > 0 else 0
    kept = min(saves, save_total_limit + 1) if save_total_limit else saves
    needed = kept * checkpoint_bytes + final_bytes
    existing = next(p for p in (output_dir, *output_dir.resolve().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    summary = (f"{kept} checkpoint(s) of {checkpoint_bytes / 1e9:.2f} GB + the final {final_bytes / 1e9:.2f} GB "
               f"= {needed / 1e9:.1f} GB, with {free / 1e9:.1f} GB free on the disk of {output_dir}")
    if needed > free:
        fit = max(int((free - final_bytes) // checkpoint_bytes) - 1, 0)
        raise ChipspanError(f"the run would not fit on disk: {summary}; pass --save_total_limit {fit} "
                            "(or fewer) or a larger --save_steps")
    if needed > 0.9 * free:
        report(f"warning: the run will nearly fill the disk: {summary}")


def checkpoints_in(output_dir: Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders, oldest first."""
    found = [p for p in output_dir.glob(f"{PREFIX}*") if re.fullmatch(rf"{PREFIX}\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def remove_old_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Keep the newest ``keep`` checkpoints (None: all)."""
    if keep is None or keep <= 0:
        return
    for old in checkpoints_in(output_dir)[:-keep]:
        shutil.rmtree(old)


def optimizer_state_by_name(model: SpannedModel, optimizer: torch.optim.Optimizer) -> dict:
    """AdamW state keyed by parameter name, on the CPU: independent of how the model is placed."""
    names = _parameter_names(model)
    state = {names[id(p)]: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
             for group in optimizer.param_groups for p in group["params"] if p in optimizer.state}
    return {"state": state, "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                             for g in optimizer.param_groups]}


def read_optimizer_state(folder: Path) -> dict:
    """A checkpoint's AdamW state keyed by parameter name, groups as ``KINDS`` orders those present:
    ``optimizer.pt``, or the ``optimizer-stage{k}-of-{n}.pt`` files of its stages merged.
    Memory-mapped: a stage that loads a share reads only that share's tensors."""
    if (folder / OPTIMIZER_FILE).is_file():
        return torch.load(folder / OPTIMIZER_FILE, weights_only=False, mmap=True)
    files = sorted(folder.glob("optimizer-stage*-of-*.pt"))
    expected = int(files[0].stem.rpartition("-of-")[2]) if files else 0
    if not files or len(files) != expected:
        raise ChipspanError(f"{folder} holds no complete optimizer state: expected {OPTIMIZER_FILE} or every "
                            f"optimizer-stage*-of-*.pt file (found {len(files)} of {expected or '?'})")
    state, groups = {}, {}
    for file in files:
        part = torch.load(file, weights_only=False, mmap=True)
        state.update(part["state"])
        for kind, group in zip(part["kinds"], part["param_groups"]):
            groups.setdefault(kind, group)
    return {"state": state, "param_groups": [groups[kind] for kind in KINDS if kind in groups]}


def load_optimizer_state(model: SpannedModel, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The optimizer state of a checkpoint written by any placement (see read_optimizer_state)."""
    saved = read_optimizer_state(folder)
    names = _parameter_names(model)
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        load_group_state(optimizer, group, saved_group, saved["state"], names)


def load_group_state(optimizer: torch.optim.Optimizer, group: dict, saved_group: dict, saved_state: dict,
                     names: dict[int, str]) -> None:
    """One parameter group's settings and its parameters' saved state (found by name, moved to their chip)."""
    group.update(saved_group)
    for p in group["params"]:
        entry = saved_state.get(names[id(p)])
        if entry is not None:
            optimizer.state[p] = {k: _own_copy(v, p.device) for k, v in entry.items()}


def _own_copy(value, device: torch.device):
    """A saved state value in memory of its own (never the memory-mapped file); 0-dim tensors
    (AdamW's step) stay on the CPU."""
    if not torch.is_tensor(value):
        return value
    return value.to(device, copy=True) if value.dim() > 0 else value.clone()


def rng_state() -> dict:
    """Python, NumPy and torch generator states; CUDA's per device when CUDA is in use."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(saved: dict) -> None:
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    torch.set_rng_state(saved["cpu"])
    if "cuda" in saved and torch.cuda.is_available() and len(saved["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["cuda"])


def _parameter_names(model: SpannedModel) -> dict[int, str]:
    names = {}
    for stage in model.stages:
        for name, param in stage.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), name)
    return names


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
