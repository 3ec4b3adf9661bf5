"""Everything checked before a weight is read, the same for one process and torchrun ranks: the
arguments, the checkpoint to resume from, the disk, the vocabulary, the examples to train."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from chipspan.args import RunArguments
from chipspan.chips.job import one_process_per_chip
from chipspan.data.loader import DataSplit
from chipspan.data.packing import pack_examples, packing_summary
from chipspan.errors import ChipspanError
from chipspan.infer.generate import sampling_settings
from chipspan.models.config import ModelConfig
from chipspan.models.tokenizer import Tokenizer
from chipspan.paths import check_output, run_inputs
from chipspan.precision import PrecisionChoice
from chipspan.train import checkpoints
from chipspan.train.finetune import check_finetuning_arguments, count_trainable
from chipspan.train.optim import saved_state_bytes
from chipspan.train.reporting import trackers_wanted


def check_arguments(run: RunArguments) -> ModelConfig:
    ft, train_args = run.finetuning, run.training
    if not (train_args.do_train or train_args.do_eval or train_args.do_predict):
        raise ChipspanError("nothing to do: add --do_train, --do_eval or --do_predict")
    _check_evaluation(run)
    trackers_wanted(train_args.report_to)
    for flag, value in (
        ("model_name_or_path", run.model.model_name_or_path),
        ("dataset", run.data.dataset or (run.data.eval_dataset and not train_args.do_train)),
        ("output_dir", train_args.output_dir),
    ):
        if not value:
            raise ChipspanError(f"--{flag} is required")
    if train_args.max_steps <= 0 and train_args.num_train_epochs <= 0:
        raise ChipspanError("set --num_train_epochs or --max_steps to a positive number")
    if not one_process_per_chip(run) and (run.chips.data_parallel != 1 or run.chips.pipeline_schedule != "1f1b"):
        raise ChipspanError(
            "--data_parallel and --pipeline_schedule set how one process per chip runs: add "
            "--launcher torchrun (or start under torchrun), or drop them to span the chips in "
            "this process"
        )
    config = ModelConfig.from_folder(run.model.model_name_or_path)
    inputs = run_inputs(run)
    check_output(train_args.output_dir, "--output_dir", inputs)
    for flag, folder in (("logging_dir", train_args.logging_dir), ("tokenized_path", run.data.tokenized_path)):
        if folder:
            check_output(folder, f"--{flag}", inputs)
    check_finetuning_arguments(ft, config, run.model.adapter_name_or_path)
    return config


def _check_evaluation(run: RunArguments) -> None:
    """Evaluation settings: an eval set to use, and generation settings chipspan supports."""
    train_args, generating = run.training, run.generating
    if (
        train_args.do_train
        and run.data.val_size == 0
        and run.data.eval_dataset is None
        and (train_args.eval_strategy != "no" or train_args.do_eval or train_args.do_predict)
    ):
        raise ChipspanError(
            "evaluating while training needs held-out rows: pass --val_size (a count or a fraction, e.g. 0.1) "
            "or --eval_dataset"
        )
    if train_args.do_predict and run.finetuning.stage != "sft":
        raise ChipspanError("--do_predict answers prompts: it needs --stage sft")
    sampling_settings(generating)  # refuses what generation cannot do, before anything loads


def check_disk(
    run: RunArguments,
    config: ModelConfig,
    precision: PrecisionChoice,
    tokenizer: Tokenizer,
    steps: int,
    report: Callable[[str], None],
) -> None:
    """Where the checkpoints go: their names free of the user's folders, and their size (from a
    meta-device count of what trains, everything a checkpoint holds) against the free disk."""
    train_args = run.training
    output_dir = Path(train_args.output_dir)
    checkpoints.check_checkpoint_names(output_dir, steps, train_args.save_steps)
    trainable, total, trained_tensors = count_trainable(config, run.finetuning)
    trained_bytes = precision.trained_dtype.itemsize
    if trainable == 0:
        raise ChipspanError("nothing is trainable; check --finetuning_type and its module settings")
    if run.finetuning.finetuning_type == "lora":
        weights = trainable * trained_bytes  # the adapter alone
    else:
        weights = trainable * trained_bytes + (total - trainable) * precision.base_dtype.itemsize
    tokenizer_bytes = checkpoints.tokenizer_size(tokenizer)
    logs = steps // max(train_args.logging_steps, 1) + 1 + (steps if train_args.eval_strategy != "no" else 0)
    moments = 0 if train_args.save_only_model else saved_state_bytes(train_args, trainable, trained_bytes)
    one = checkpoints.checkpoint_size(weights, moments, trained_tensors, tokenizer_bytes, logs)
    final = checkpoints.checkpoint_size(weights, 0, trained_tensors, tokenizer_bytes, logs)
    checkpoints.check_disk_space(
        output_dir, steps, train_args.save_steps, train_args.save_total_limit, one, final, report
    )


def resume_point(run: RunArguments, settings: dict, report: Callable[[str], None]) -> Path | None:
    """The checkpoint to resume from, None to start fresh; refuses to write into someone's folder.

    --resume_from_checkpoint is a folder, or true for the last intact checkpoint in output_dir; without
    it a non-empty output_dir resumes from its last intact one (a damaged newer one is skipped with a
    notice). The checkpoint must have been trained with this run's ``settings`` (run_settings), and
    its files must hold tensors and plain values only.
    """
    output_dir, asked = Path(run.training.output_dir), run.training.resume_from_checkpoint
    found = checkpoints.checkpoint_folders(output_dir)
    if asked is not None and asked.lower() not in ("false", "0", "no"):
        if asked.lower() in ("true", "1", "yes"):
            if not found:
                raise ChipspanError(f"--resume_from_checkpoint true, but {output_dir} holds no checkpoint-N folder")
            chosen = checkpoints.last_valid(found, report)
        else:
            chosen = Path(asked)
            wrong = checkpoints.damage(chosen) if chosen.is_dir() else "no such folder"
            if wrong:
                raise ChipspanError(
                    f"--resume_from_checkpoint {asked} is not a checkpoint folder chipspan can resume from: {wrong}"
                )
    elif run.training.overwrite_output_dir or not output_dir.exists() or not any(output_dir.iterdir()):
        return None
    elif found:
        chosen = checkpoints.last_valid(found, report)
    else:
        raise ChipspanError(
            f"output_dir {output_dir} is not empty and holds no checkpoint to resume from; "
            "pass --overwrite_output_dir to write over it, or choose an empty folder"
        )
    checkpoints.check_resumable(chosen)
    checkpoints.check_continues(chosen, settings, report)
    checkpoints.check_loadable(chosen)
    return chosen


def check_vocabulary(
    tokenizer: Tokenizer, config: ModelConfig, template: str, data: DataSplit, report: Callable[[str], None]
) -> None:
    """Refuse a run that needs token ids the model's embeddings (``config.vocab_size`` rows) do not hold.

    A template may add stop words beyond them (LLaMA-Factory 0.9's llama3 adds ``<|eom_id|>`` to Llama
    3.0's tokenizer). As in LLaMA-Factory without ``resize_vocab``, that is harmless while EOS and every
    encoded example stay below ``vocab_size``: then the run goes on with a notice."""
    rows = config.vocab_size
    if tokenizer.vocab_size <= rows:
        return
    ids = np.concatenate([data.train.input_ids, data.eval.input_ids])
    needed = set(np.unique(ids[ids >= rows]).tolist())
    eos = tokenizer.eos_token_id
    if eos is not None and eos >= rows:
        needed.add(eos)
    beyond = sorted(needed) or list(range(rows, tokenizer.vocab_size))
    named = ", ".join(f"{tokenizer.id_to_token(i)} (id {i})" for i in beyond[:3])
    named += f" and {len(beyond) - 3} more" if len(beyond) > 3 else ""
    head = f"the tokenizer has {tokenizer.vocab_size} tokens (template '{template}' may have added some) but the model's vocab_size is {rows}"
    if needed:
        raise ChipspanError(
            f"{head}, and the run needs ids beyond it: {named} (EOS, or in the encoded data); resizing embeddings "
            "is not supported yet: pick a template the tokenizer knows"
        )
    report(f"note: {head}; the ids beyond it ({named}) are never used: the embeddings stay as they are")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_examples(run: RunArguments, data: DataSplit, report: Callable[[str], None]):
    """(train, eval) examples: without --do_train every row is evaluated; SFT packing applies to train."""
    if not run.training.do_train:
        return [], [*data.train, *data.eval]
    examples = data.train
    if run.finetuning.stage == "sft" and (run.data.packing or run.data.sft_packing):  # pt is already in blocks
        examples = list(examples)
        # an lf-0.5 template with efficient_eos may make an example one token longer than cutoff_len
        block = max(run.data.cutoff_len, max(len(e.input_ids) for e in examples))
        packed = pack_examples(examples, block)
        report(packing_summary(len(examples), packed, block))
        examples = packed
    return examples, data.eval
