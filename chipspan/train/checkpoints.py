"""``checkpoint-N/`` folders: the trained weights plus everything needed to continue the run.

A checkpoint holds the adapter (PEFT format) or the model (HF safetensors), the tokenizer files,
``optimizer.pt`` (AdamW state keyed by parameter name, so it loads into any placement; a run of
one process per stage writes ``optimizer-stage{k}-of-{n}.pt`` instead, one per pipeline position),
``scheduler.pt``, ``rng_state.pth``, ``scaler.pt`` (the fp16 loss scale), ``trainer_state.json``
and, written last, ``chipspan_manifest.json`` (``chipspan.manifest``: every file's size and sha256,
and the settings the run was trained with). Checkpoints come every ``save_steps`` and at the last
step, as the HF Trainer saves them. Under ``--save_only_model`` a checkpoint holds the weights, the
tokenizer and ``trainer_state.json`` only: it is evaluated or exported, never resumed from.

Durability: a checkpoint is written into a hidden ``.checkpoint-N.tmp`` folder, every file and the
folder are fsynced, then the manifest is written and fsynced, and only then is the folder renamed to
``checkpoint-N`` (and the parent fsynced). A kill or power loss at any moment leaves the previous
checkpoints intact and at worst a hidden temporary folder, which resume never picks and the next
save removes.

Trust: a ``checkpoint-N`` folder is chipspan's only if it holds chipspan's manifest; only such
folders are rotated or removed (their listed files only), and resumed from only while every file
matches the manifest (else the one before is taken, with a notice). The
``.pt``/``.pth`` files hold tensors and plain values only and are read with ``weights_only``: a
checkpoint from someone else can fail to load, never run code. Resume refuses a checkpoint trained
with other settings (finetuning type, LoRA rank/alpha/targets, model config) and names the difference.

``output_dir`` is shared with the user: chipspan marks it (an ``output_dir`` manifest) when it first
writes there, and what it writes there has fixed names (``RUN_OUTPUTS``); ``--overwrite_output_dir``
removes those and chipspan's checkpoints, and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from chipspan import manifest
from chipspan.adapters.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_state_dict, save_adapter
from chipspan.args import RunArguments
from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig
from chipspan.models.decoder import CausalLM
from chipspan.models.tokenizer import Tokenizer
from chipspan.models.weights import SAFETENSORS_INDEX, model_state_dict, save_weights
from chipspan.optim.offload import state_device
from chipspan.precision import Precision
from chipspan.train.loop import save_due
from chipspan.train.optim import KINDS, group_kind, parameter_names
from chipspan.train.reporting import LOG_FILE, PREDICTIONS_FILE, STATE_FILE, TrainerState

PREFIX = "checkpoint-"
CHECKPOINT, OUTPUT_DIR = "checkpoint", "output_dir"  # the kinds of folder chipspan's manifests mark
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pth"
SCALER_FILE = "scaler.pt"  # fp16 loss scale and skipped-step count (as the HF Trainer names it)
# What a run writes directly in output_dir besides its checkpoints (the tokenizer's files as
# Tokenizer.save names them; "runs": TensorBoard's default folder).
RUN_OUTPUTS = (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    "config.json",
    "model.safetensors",
    SAFETENSORS_INDEX,
    "model-*-of-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    LOG_FILE,
    STATE_FILE,
    "train_results.json",
    "eval_results.json",
    "predict_results.json",
    "all_results.json",
    "training_loss.png",
    "training_eval_loss.png",
    PREDICTIONS_FILE,
    "runs",
)
# The settings a checkpoint is continued with only if this run asks for the same (see run_settings).
CONTINUED_SETTINGS = ("finetuning_type", "lora_rank", "lora_alpha", "lora_target", "optim", "offload_optimizer")
# What a setting recorded only by later versions meant in a checkpoint that lacks it.
SETTINGS_BEFORE_RECORDED = {"optim": "adamw_torch", "offload_optimizer": False}


def save_trained_weights(stages: list[CausalLM], folder: Path, base_model: str, is_lora: bool) -> None:
    """The adapter (LoRA) or the whole model (full, freeze) gathered from every stage, in HF formats."""
    tensors: dict[str, torch.Tensor] = {}
    for stage in stages:
        tensors.update(adapter_state_dict(stage) if is_lora else model_state_dict(stage))
    write_trained_weights(tensors, stages[0], folder, base_model, is_lora)


def write_trained_weights(
    tensors: dict[str, torch.Tensor], first_stage: CausalLM, folder: Path, base_model: str, is_lora: bool
) -> None:
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


@dataclass(frozen=True)
class RunFiles:
    """What a run's checkpoints and final outputs are written with, by every placement."""

    output_dir: Path
    tokenizer: Tokenizer
    base_model: str  # the model folder the run started from (its config; LoRA's base)
    is_lora: bool  # the trained weights are an adapter
    settings: dict  # run_settings: what a resume must match
    save_only_model: bool = False  # checkpoints without optimizer, scheduler, RNG and loss-scale state


def save_checkpoint(
    files: RunFiles,
    step: int,
    stages: list[CausalLM],
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainerState,
    precision_state: dict | None = None,
) -> Path:
    """``checkpoint-{step}`` in ``files.output_dir``; returns its folder. ``precision_state``: the
    fp16 loss scaler's (``scaler.pt``)."""
    tmp = start_checkpoint(files.output_dir, step)
    save_trained_weights(stages, tmp, files.base_model, files.is_lora)
    if not files.save_only_model:
        torch.save(optimizer_state_by_name(stages, optimizer), tmp / OPTIMIZER_FILE)
    save_run_state(files, tmp, scheduler.state_dict(), state, precision_state)
    return finish_checkpoint(tmp, files.output_dir, step, files.settings)


def save_run_state(
    files: RunFiles, tmp: Path, schedule: dict | None, state: TrainerState, precision_state: dict | None
) -> None:
    """What a checkpoint holds besides the weights and the optimizer: the tokenizer and the trainer
    state, then (unless ``files.save_only_model``) ``schedule``, the random generators and the loss scale."""
    files.tokenizer.save(tmp)
    state.save(tmp)
    if files.save_only_model:
        return
    torch.save(schedule, tmp / SCHEDULER_FILE)
    torch.save(rng_state(), tmp / RNG_FILE)
    if precision_state is not None:
        torch.save(precision_state, tmp / SCALER_FILE)


def start_checkpoint(output_dir: Path, step: int) -> Path:
    """The hidden temporary folder ``checkpoint-{step}`` is written into (leftovers of killed saves removed)."""
    remove_unfinished(output_dir)
    return temporary_folder(output_dir, step)


def temporary_folder(output_dir: Path, step: int) -> Path:
    return output_dir / f".{PREFIX}{step}.tmp"


def finish_checkpoint(
    tmp: Path, output_dir: Path, step: int, settings: dict, known: dict[str, dict] | None = None
) -> Path:
    """Flush ``tmp`` to the disk, seal it with its manifest (``known``: entries of files whose writers
    hashed them), then rename it to ``checkpoint-{step}``; returns that folder."""
    final = output_dir / f"{PREFIX}{step}"
    if final.exists() and manifest.read(final, CHECKPOINT) is None:
        raise ChipspanError(
            f"{final} is not a checkpoint chipspan wrote, and this run would save its step {step} "
            "there: move that folder out of output_dir"
        )
    _fsync_tree(tmp)
    manifest.seal(tmp, CHECKPOINT, settings, known)
    fsync(tmp)
    if final.exists():  # resumed from an earlier checkpoint: this step is written again
        replaced = final.rename(output_dir / f".{PREFIX}{step}.old")
        tmp.rename(final)
        manifest.remove_sealed(replaced, CHECKPOINT)
    else:
        tmp.rename(final)
    fsync(output_dir)
    return final


def remove_unfinished(output_dir: Path) -> None:
    """Remove the hidden folders a killed save left behind (never a complete checkpoint): a half-written
    ``.tmp`` folder, and the files chipspan listed in a replaced ``.old`` one."""
    for leftover in output_dir.glob(f".{PREFIX}*"):
        if leftover.is_dir() and leftover.suffix == ".tmp":
            shutil.rmtree(leftover)
        elif leftover.is_dir() and leftover.suffix == ".old":
            manifest.remove_sealed(leftover, CHECKPOINT)


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


def check_disk_space(
    output_dir: Path,
    steps: int,
    save_steps: int,
    save_total_limit: int | None,
    checkpoint_bytes: int,
    final_bytes: int,
    report,
) -> None:
    """Refuse a run whose checkpoints cannot fit on the disk of ``output_dir``; warn when nearly so.

    ``checkpoint_bytes``: one checkpoint (:func:`checkpoint_size`); ``final_bytes``: the final outputs.
    With ``save_total_limit`` N, N + 1 checkpoints exist for a moment (the new one before the oldest goes).
    """
    saves = math.ceil(steps / save_steps) if save_steps > 0 else 0  # the last step's included
    kept = min(saves, save_total_limit + 1) if save_total_limit else saves
    needed = kept * checkpoint_bytes + final_bytes
    existing = next(p for p in (output_dir, *output_dir.resolve().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    summary = (
        f"{kept} checkpoint(s) of {checkpoint_bytes / 1e9:.2f} GB + the final {final_bytes / 1e9:.2f} GB "
        f"= {needed / 1e9:.1f} GB, with {free / 1e9:.1f} GB free on the disk of {output_dir}"
    )
    if needed > free:
        fit = int((free - final_bytes) // checkpoint_bytes) - 1 if checkpoint_bytes else 0
        if fit >= 1:
            advice = f"pass --save_total_limit {fit} (or fewer) or a larger --save_steps"
        elif final_bytes <= free:
            advice = (
                "no rotation of checkpoints fits beside the final outputs: pass --save_steps 0 (no "
                "checkpoints), or free space or choose an output_dir on another disk"
            )
        else:
            advice = "even the final outputs do not fit: free space or choose an output_dir on another disk"
        raise ChipspanError(f"the run would not fit on disk: {summary}; {advice}")
    if needed > 0.9 * free:
        report(f"warning: the run will nearly fill the disk: {summary}")


# Upper bounds, measured on chipspan's own files, of what comes with the tensors of a checkpoint:
_BYTES_PER_TENSOR = 2048  # per trained tensor: its safetensors header entry, its AdamW state's records in the
#                           optimizer file (step, exp_avg, exp_avg_sq: zip entries, 64-byte alignment, name)
_BYTES_PER_LOG = 512  # per trainer_state.json log_history entry
_FIXED_BYTES = 64 * 1024  # scheduler.pt, rng_state.pth, scaler.pt, config/adapter_config, manifest, state


def checkpoint_size(weights: int, moments: int, trained_tensors: int, tokenizer_bytes: int, logs: int) -> int:
    """Bytes one checkpoint holds: ``weights`` (the saved weights), ``moments`` (the optimizer's state,
    ``optim.saved_state_bytes``), then what comes with them: per-tensor records for ``trained_tensors``
    tensors, the tokenizer's files, a trainer state of ``logs`` log entries, and the small files."""
    return (
        weights + moments + trained_tensors * _BYTES_PER_TENSOR + tokenizer_bytes + logs * _BYTES_PER_LOG + _FIXED_BYTES
    )


def tokenizer_size(tokenizer: Tokenizer) -> int:
    """Bytes of the tokenizer.json that Tokenizer.save writes (its small configs count in _FIXED_BYTES)."""
    return len(tokenizer.backend.to_str(pretty=True).encode())


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Every ``checkpoint-N`` folder in ``output_dir``, chipspan's or not, oldest (lowest N) first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.glob(f"{PREFIX}*") if re.fullmatch(rf"{PREFIX}\d+", p.name) and p.is_dir()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    return int(folder.name[len(PREFIX) :])


def checkpoints_in(output_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders chipspan wrote (they hold its manifest), oldest first."""
    return [p for p in checkpoint_folders(output_dir) if manifest.read(p, CHECKPOINT) is not None]


def remove_old_checkpoints(output_dir: Path, keep: int | None, newest: Path) -> None:
    """Keep ``newest`` (the checkpoint just written) and the next ``keep - 1`` of chipspan's checkpoints
    (None: all). Checkpoints of later steps than ``newest`` are of a run this one replaced (it resumed
    from an earlier step) and go first; folders chipspan did not write are never touched."""
    if keep is None or keep <= 0:
        return
    step = checkpoint_step(newest)
    others = [p for p in checkpoints_in(output_dir) if p != newest]
    oldest_first = [p for p in others if checkpoint_step(p) > step] + [p for p in others if checkpoint_step(p) < step]
    for old in oldest_first[: max(len(others) - (keep - 1), 0)]:
        manifest.remove_sealed(old, CHECKPOINT)


def check_checkpoint_names(output_dir: Path, steps: int, save_steps: int) -> None:
    """Refuse a run that would save a checkpoint where a folder of that name is not chipspan's."""
    if save_steps <= 0:
        return
    for folder in checkpoint_folders(output_dir):
        step = checkpoint_step(folder)
        if step <= steps and save_due(step, steps, save_steps) and manifest.read(folder, CHECKPOINT) is None:
            raise ChipspanError(
                f"output_dir {output_dir} holds {folder.name}, which chipspan did not write, and this "
                f"run would save its step {step} there: move that folder, or choose another output_dir"
            )


# --- resume: which checkpoint, and whether it continues this run ---------------------------------


def damage(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (missing, truncated or changed files, no manifest), or None."""
    return manifest.problem(folder, CHECKPOINT)


def last_valid(folders: list[Path], report: Callable[[str], None]) -> Path:
    """The newest of ``folders`` (oldest first) that is intact, with a notice naming each newer one skipped
    and why; a ChipspanError naming what is wrong with each when none is intact."""
    skipped = []
    for folder in reversed(folders):
        wrong = damage(folder)
        if wrong is None:
            if skipped:
                report(
                    f"notice: not resuming from {'; '.join(skipped)}; resuming from {folder.name}, the last "
                    "intact checkpoint"
                )
            return folder
        skipped.append(f"{folder.name} ({wrong})")
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    raise ChipspanError(
        f"no checkpoint in {folders[0].parent} can be resumed from: {'; '.join(skipped[:3])}{more}; "
        "pass --overwrite_output_dir to start afresh, or choose another output_dir"
    )


def check_resumable(folder: Path) -> None:
    """Refuse to continue from ``folder`` when it holds the weights only (saved with --save_only_model:
    its manifest lists no scheduler state)."""
    if SCHEDULER_FILE not in manifest.read(folder, CHECKPOINT)["files"]:
        raise ChipspanError(
            f"{folder} was saved with --save_only_model: it holds the weights but no optimizer state, so "
            "no run can continue from it (evaluate or export it); to train on, resume from a checkpoint "
            "saved without --save_only_model, or start afresh in another output_dir (or with "
            "--overwrite_output_dir, which removes these checkpoints)"
        )


def check_steps_left(folder: Path | None, steps: int, output_dir: Path) -> None:
    """Refuse to resume from ``folder`` (None: not resuming) when it is at or past this run's last
    step ``steps``: a finished run stays as it is unless the user asks for more steps or a new run.
    A run stopped after its last checkpoint, before its outputs in ``output_dir`` were written, is
    resumed (at its end) to write them."""
    if folder is None:
        return
    done = TrainerState.load(folder).global_step
    if done < steps or (done == steps and finished_step(output_dir) != done):
        return
    if done == steps:
        where = f"the run in {output_dir} is finished: {folder.name} is its last step ({done})"
    else:
        where = f"{folder.name} is at step {done}, past this run's {steps} steps"
    raise ChipspanError(
        f"{where}; raise --max_steps (or --num_train_epochs) above {done} to train further from it, pass "
        "--overwrite_output_dir to start again (it removes this run's outputs and checkpoints), or choose "
        "another output_dir"
    )


def finished_step(output_dir: Path) -> int | None:
    """The step the run in ``output_dir`` wrote its final outputs at (its ``trainer_state.json``), None
    when it has not written them."""
    return TrainerState.load(output_dir).global_step if (output_dir / STATE_FILE).is_file() else None


def run_settings(run: RunArguments, config: ModelConfig) -> dict:
    """What a checkpoint records of the run that wrote it, for a later run to continue it only alike:
    the CONTINUED_SETTINGS, the model's path and its config (shape and numerics, as ModelConfig reads it)."""
    ft = run.finetuning
    settings = {
        "finetuning_type": ft.finetuning_type,
        "optim": run.training.optim,  # the optimizer state's layout
        "offload_optimizer": run.training.offload_optimizer,
        "model_name_or_path": str(Path(run.model.model_name_or_path).resolve()),
        "model_config": json.loads(
            json.dumps(
                {f.name: getattr(config, f.name) for f in fields(config) if f.name not in ("raw", "torch_dtype")}
            )
        ),
    }
    if ft.finetuning_type == "lora":
        targets = sorted({name.strip() for name in (ft.lora_target or "").split(",") if name.strip()})
        settings.update(
            lora_rank=ft.lora_rank,
            lora_target=",".join(targets),
            lora_alpha=float(ft.lora_alpha if ft.lora_alpha is not None else 2 * ft.lora_rank),
        )
    return settings


def check_continues(folder: Path, settings: dict, report: Callable[[str], None]) -> None:
    """Refuse to continue checkpoint ``folder`` with settings other than it was trained with, naming the
    first difference; a notice when only the model's path differs (the same config elsewhere)."""
    saved = manifest.read(folder, CHECKPOINT)["settings"]
    afresh = "or start afresh in another output_dir (or with --overwrite_output_dir)"
    for key in CONTINUED_SETTINGS:
        before = saved.get(key, SETTINGS_BEFORE_RECORDED.get(key))
        if before != settings.get(key):
            raise ChipspanError(
                f"{folder.name} was trained with {key} {_shown(before)}, this run asks for "
                f"{_shown(settings.get(key))}: pass --{key} {_shown(before)} to continue it, "
                f"{afresh}"
            )
    ours, theirs = settings["model_config"], saved.get("model_config", {})
    differs = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
    if differs:
        key = differs[0]
        raise ChipspanError(
            f"{folder.name} was trained on a model with {key} {_shown(theirs.get(key))} "
            f"({saved.get('model_name_or_path')}), this run's model has {_shown(ours.get(key))} "
            f"({settings['model_name_or_path']}): pass the model it was trained on, {afresh}"
        )
    if saved.get("model_name_or_path") != settings["model_name_or_path"]:
        report(
            f"notice: {folder.name} was trained from {saved.get('model_name_or_path')}; continuing it on "
            f"{settings['model_name_or_path']}, whose config is the same"
        )


def _shown(value) -> str:
    """A setting as a flag value: 16 rather than 16.0, "none" for absent."""
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def read_saved(file: Path, mmap: bool = False):
    """A ``.pt``/``.pth`` file of a checkpoint as tensors and plain values; anything else (an object
    whose unpickling could run code, a damaged file) is a ChipspanError naming the file."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise ChipspanError(
            f"{file} holds objects other than tensors and plain values, which chipspan never "
            "loads (they could run code): it is not a checkpoint chipspan wrote; resume from "
            "another checkpoint, or start afresh"
        ) from None
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ChipspanError(f"{file} cannot be read as a chipspan checkpoint file: {reason}") from None


def check_loadable(folder: Path) -> None:
    """Read every ``.pt``/``.pth`` file of a checkpoint as :func:`read_saved` will (memory-mapped: the
    tensors' bytes are not read), so that a foreign one is refused before any weight loads."""
    for file in sorted([*folder.glob("*.pt"), *folder.glob("*.pth")]):
        read_saved(file, mmap=True)


@contextmanager
def restoring(folder: Path) -> Iterator[None]:
    """Turn a checkpoint whose files load but do not hold what chipspan saves into one error line."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise ChipspanError(
            f"{folder} does not hold the training state chipspan saves ({type(exc).__name__}: "
            f"{str(exc)[:200]}); resume from another checkpoint, or start afresh"
        ) from None


# --- output_dir: what chipspan wrote there -------------------------------------------------------


def owned_outputs(output_dir: Path) -> list[Path]:
    """The entries of ``output_dir`` a chipspan run wrote (RUN_OUTPUTS, in a folder chipspan marked)."""
    if not output_dir.is_dir() or manifest.read(output_dir, OUTPUT_DIR) is None:
        return []
    return sorted({p for pattern in RUN_OUTPUTS for p in output_dir.glob(pattern)})


def check_outputs_free(output_dir: Path) -> None:
    """Refuse a run whose outputs would overwrite files of the user's in ``output_dir`` (a name the run
    writes, in a folder chipspan never wrote in)."""
    if not output_dir.is_dir():
        return
    owned = set(owned_outputs(output_dir))
    theirs = sorted({p.name for pattern in RUN_OUTPUTS for p in output_dir.glob(pattern)} - {p.name for p in owned})
    if theirs:
        raise ChipspanError(
            f"output_dir {output_dir} holds {theirs[0]}, which chipspan did not write and this run "
            "would overwrite: move it, or choose another output_dir"
        )


def prepare_output_dir(output_dir: Path, remove_earlier_run: bool) -> None:
    """Create and mark ``output_dir``; with ``remove_earlier_run`` (--overwrite_output_dir, not resuming)
    first remove what an earlier run wrote there, its checkpoints included, so that nothing resumes
    from them. Everything else in ``output_dir`` stays."""
    if remove_earlier_run:
        for path in owned_outputs(output_dir):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        for folder in checkpoints_in(output_dir):
            manifest.remove_sealed(folder, CHECKPOINT)
        remove_unfinished(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest.mark(output_dir, OUTPUT_DIR)


def optimizer_state_by_name(stages: list[CausalLM], optimizer: torch.optim.Optimizer) -> dict:
    """AdamW state keyed by parameter name, on the CPU, and the kind of each group (``optim.KINDS``):
    independent of how the model is placed."""
    names = parameter_names(stages)
    state = {
        names[id(p)]: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
        for group in optimizer.param_groups
        for p in group["params"]
        if p in optimizer.state
    }
    return {
        "state": state,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "kinds": [group_kind(g, names) for g in optimizer.param_groups],
    }


def read_optimizer_state(folder: Path) -> dict:
    """A checkpoint's AdamW state keyed by parameter name, and its groups by kind (``optim.KINDS``):
    ``optimizer.pt``, or the ``optimizer-stage{k}-of-{n}.pt`` files of its stages merged.
    Memory-mapped: a stage that loads a share reads only that share's tensors."""
    if (folder / OPTIMIZER_FILE).is_file():
        return _groups_by_kind(read_saved(folder / OPTIMIZER_FILE, mmap=True))
    files = sorted(folder.glob("optimizer-stage*-of-*.pt"))
    expected = int(files[0].stem.rpartition("-of-")[2]) if files else 0
    if not files or len(files) != expected:
        raise ChipspanError(
            f"{folder} holds no complete optimizer state: expected {OPTIMIZER_FILE} or every "
            f"optimizer-stage*-of-*.pt file (found {len(files)} of {expected or '?'})"
        )
    state, groups = {}, {}
    for file in files:
        part = _groups_by_kind(read_saved(file, mmap=True))
        state.update(part["state"])
        for kind, group in part["groups"].items():
            groups.setdefault(kind, group)
    return {"state": state, "groups": groups}


def _groups_by_kind(saved: dict) -> dict:
    """{"state", "groups": {kind: group settings}} of a saved optimizer state (one written before the
    kinds were recorded lists its groups in ``KINDS`` order)."""
    kinds = saved.get("kinds") or list(KINDS[: len(saved["param_groups"])])
    return {"state": saved["state"], "groups": dict(zip(kinds, saved["param_groups"]))}


def load_optimizer_state(stages: list[CausalLM], optimizer: torch.optim.Optimizer, scheduler, folder: Path) -> None:
    """The optimizer and scheduler state of a checkpoint written by any placement, for the
    parameters of ``stages`` (all of the model's, or one rank's): each group's settings by kind,
    each parameter's moments by name, moved to its chip (to the host for the host-offloaded AdamW)."""
    saved = read_optimizer_state(folder)
    names = parameter_names(stages)
    for group in optimizer.param_groups:
        group.update(saved["groups"].get(group_kind(group, names), {}))
        for p in group["params"]:
            entry = saved["state"].get(names[id(p)])
            if entry is not None:
                optimizer.state[p] = {k: _own_copy(v, state_device(optimizer, p)) for k, v in entry.items()}
    schedule = read_saved(folder / SCHEDULER_FILE)
    scheduler.load_state_dict(resize_scheduler(schedule, len(optimizer.param_groups)))


def resize_scheduler(schedule: dict | None, groups: int) -> dict | None:
    """A LambdaLR state for ``groups`` parameter groups (every group has the same learning rate)."""
    if schedule is None:
        return None
    resized = dict(schedule)
    for key in ("base_lrs", "_last_lr"):
        if resized.get(key):
            resized[key] = [resized[key][0]] * groups
    return resized


def restore_training(
    folder: Path, stages: list[CausalLM], optimizer, scheduler, precision: Precision, fresh: TrainerState
) -> TrainerState:
    """Where a run continues from checkpoint ``folder``: the optimizer and schedule of ``stages``
    (none on a rank that trains nothing), the loss scale, the random generators, the trainer state
    (its ``max_steps`` this run's)."""
    with restoring(folder):
        if optimizer is not None:
            load_optimizer_state(stages, optimizer, scheduler, folder)
        if (folder / SCALER_FILE).is_file():
            precision.load_state_dict(read_saved(folder / SCALER_FILE))
        restore_rng_state(read_saved(folder / RNG_FILE))
    state = TrainerState.load(folder)
    state.max_steps = fresh.max_steps
    return state


def _own_copy(value, device: torch.device):
    """A saved state value in memory of its own (never the memory-mapped file); 0-dim tensors
    (AdamW's step) stay on the CPU."""
    if not torch.is_tensor(value):
        return value
    return value.to(device, copy=True) if value.dim() > 0 else value.clone()


def rng_state() -> dict:
    """Python, NumPy and torch generator states (CUDA's per device when CUDA is in use), as tensors,
    lists and numbers only, so that ``rng_state.pth`` loads with ``weights_only``."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(saved: dict) -> None:
    python, numpy = saved["python"], saved["numpy"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(saved["cpu"])
    if "cuda" in saved and torch.cuda.is_available() and len(saved["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["cuda"])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
