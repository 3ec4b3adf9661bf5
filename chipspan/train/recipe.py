"""`chipspan train`: the whole job, top to bottom.

    arguments -> checks -> placement -> output_dir -> tokenizer -> data -> weights on the chips
    -> what trains -> optimizer -> loop (with evaluation) -> outputs -> final evaluation -> predictions

Everything that can be wrong with the user's input is found before a single weight is read.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from chipspan import devices
from chipspan.args import RunArguments
from chipspan.chips.placement import Placement
from chipspan.chips.plan import one_process_per_chip, train_chips
from chipspan.chips.span import SpannedModel
from chipspan.data.loader import DataSplit, load_dataset_split
from chipspan.data.packing import pack_examples, packing_summary
from chipspan.errors import ChipspanError
from chipspan.infer.chat import stop_token_ids
from chipspan.models.config import ModelConfig
from chipspan.models.tokenizer import Tokenizer
from chipspan.paths import check_output, run_inputs
from chipspan.train import checkpoints
from chipspan.train.evaluate import eval_loss, predictions, sampling_settings
from chipspan.train.finetune import check_finetuning_arguments, count_trainable, prepare_trainable
from chipspan.train.health import nonfinite_weight, refuse_nonfinite_weights
from chipspan.train.loop import Precision, total_steps, train
from chipspan.train.reporting import (
    LOG_FILE,
    PREDICTIONS_FILE,
    TrainerState,
    TrainLog,
    plot_metric,
    tensorboard_wanted,
    truncate_log,
    write_results,
)
from chipspan.train.schedule import build_scheduler, warmup_steps_for


def run_train(run: RunArguments, report: Callable[[str], None] = print) -> Path:
    """Train, evaluate and/or predict as ``run`` says; returns the output folder."""
    model_args, data_args, ft_args, train_args = run.model, run.data, run.finetuning, run.training
    config = check_arguments(run)
    placement, micro_batches = _placement(run, config)
    run = replace(run, training=replace(run.training, micro_batches=micro_batches))
    train_args = run.training
    output_dir = Path(train_args.output_dir)
    settings = checkpoints.run_settings(run, config)
    checkpoints.check_outputs_free(output_dir)
    resume = resume_point(run, settings, report) if train_args.do_train else None
    tokenizer = Tokenizer.from_folder(model_args.model_name_or_path)
    data = load_dataset_split(data_args, tokenizer, ft_args.stage, train_args.seed)
    report(data.stats.summary())
    examples, eval_examples = split_examples(run, data, report)
    if tokenizer.vocab_size > config.vocab_size:
        raise ChipspanError(
            f"the tokenizer has {tokenizer.vocab_size} tokens (template '{data_args.template}' "
            f"may have added some) but the model's vocab_size is {config.vocab_size}; "
            "resizing embeddings is not supported yet: pick a template the tokenizer knows"
        )
    precision, base_dtype = choose_precision(run, placement.devices[0].type, report)
    steps = total_steps(len(examples), train_args) if train_args.do_train else 0
    if train_args.do_train:
        check_disk(run, config, base_dtype, tokenizer, steps, report)

    seed_everything(train_args.seed)
    weights = resume if (resume and ft_args.finetuning_type != "lora") else Path(model_args.model_name_or_path)
    model = SpannedModel.load(weights, placement, base_dtype)
    for stage in model.stages:
        stage.gradient_checkpointing = not train_args.disable_gradient_checkpointing
    adapter = resume if (resume and ft_args.finetuning_type == "lora") else model_args.adapter_name_or_path
    trained_dtype = torch.bfloat16 if ft_args.pure_bf16 and base_dtype == torch.bfloat16 else torch.float32
    prepare_trainable(model, ft_args, adapter=str(adapter) if adapter else None, trained_dtype=trained_dtype)
    _report_placement(model, placement, train_args.micro_batches, report)
    checkpoints.prepare_output_dir(output_dir, train_args.do_train and train_args.overwrite_output_dir and not resume)

    def evaluate() -> float:
        return eval_loss(model, eval_examples, tokenizer.pad_token_id, train_args.per_device_eval_batch_size, precision)

    metrics: dict[str, float] = {}
    if train_args.do_train:
        metrics = _train(
            run,
            model,
            tokenizer,
            examples,
            steps,
            precision,
            resume,
            output_dir,
            settings,
            evaluate if train_args.eval_strategy != "no" else None,
            report,
        )
    if train_args.do_eval:
        final_evaluation(evaluate, len(eval_examples), metrics.get("epoch"), output_dir, report)
    if train_args.do_predict:
        _predict(run, model, tokenizer, eval_examples, output_dir, report)
    return output_dir


def _train(
    run: RunArguments,
    model: SpannedModel,
    tokenizer: Tokenizer,
    examples,
    steps: int,
    precision: Precision,
    resume: Path | None,
    output_dir: Path,
    settings: dict,
    evaluate,
    report,
) -> dict[str, float]:
    """The training loop and what it leaves in ``output_dir``; returns the train metrics.
    ``settings``: what the checkpoints record of this run (checkpoints.run_settings)."""
    model_args, ft_args, train_args = run.model, run.finetuning, run.training
    optimizer = build_optimizer(model, train_args)
    scheduler = build_scheduler(
        optimizer,
        train_args.lr_scheduler_type,
        steps,
        warmup_steps_for(steps, train_args.warmup_steps, train_args.warmup_ratio),
    )
    state = TrainerState(
        max_steps=steps,
        num_train_epochs=train_args.num_train_epochs,
        logging_steps=train_args.logging_steps,
        save_steps=train_args.save_steps,
        train_batch_size=train_args.per_device_train_batch_size,
    )
    if resume:
        state = _restore(resume, model, optimizer, scheduler, precision, state)
        report(f"resuming from {resume} at step {state.global_step}")
    truncate_log(output_dir / LOG_FILE, state.global_step)  # drop lines of the run being replaced

    base_model = model_args.model_name_or_path
    is_lora = ft_args.finetuning_type == "lora"

    def trained_weights_finite(where: str) -> None:
        refuse_nonfinite_weights(nonfinite_weight(p for stage in model.stages for p in stage.named_parameters()), where)

    def save(step: int) -> None:
        trained_weights_finite(f"checkpoint-{step}")
        written = checkpoints.save_checkpoint(
            output_dir,
            step,
            model,
            tokenizer,
            optimizer,
            scheduler,
            state,
            base_model,
            is_lora,
            settings,
            precision.state_dict(),
        )
        checkpoints.remove_old_checkpoints(output_dir, train_args.save_total_limit, written)

    report(
        f"training {len(examples)} examples for {steps} steps "
        f"(batch {train_args.per_device_train_batch_size} x {train_args.gradient_accumulation_steps} accumulation)"
    )
    tensorboard = tensorboard_dir(run) if tensorboard_wanted(train_args.report_to) else None
    log = TrainLog(output_dir, steps, state.global_step, tensorboard_dir=tensorboard)
    try:
        metrics = train(
            model,
            examples,
            tokenizer.pad_token_id,
            train_args,
            optimizer,
            scheduler,
            precision,
            state,
            log,
            save,
            report,
            evaluate=evaluate,
            memory=lambda: _chip_memory(model.placement),
        )
    finally:
        log.close()

    metrics.update(_peak_memory(model.placement, report))
    trained_weights_finite(f"the final {'adapter' if is_lora else 'model'}")
    checkpoints.save_trained_weights(model, output_dir, base_model, is_lora)
    write_run_outputs(output_dir, tokenizer, state, metrics, ft_args.plot_loss, is_lora, report)
    return metrics


def write_run_outputs(
    output_dir: Path,
    tokenizer: Tokenizer,
    state: TrainerState,
    metrics: dict[str, float],
    plot_loss: bool,
    is_lora: bool,
    report: Callable[[str], None],
) -> None:
    """What a finished run leaves beside its weights: tokenizer, trainer state, results, plots."""
    tokenizer.save(output_dir)
    state.log_history.append({**metrics, "step": state.global_step})
    state.save(output_dir)
    write_results(output_dir, metrics)
    if plot_loss:
        for key in ("loss", "eval_loss"):
            plot = plot_metric(output_dir, state.log_history, key)
            if plot:
                report(f"{key} plot: {plot}")
    report(f"{'adapter' if is_lora else 'model'} saved in {output_dir}")


def final_evaluation(evaluate, num_examples: int, epoch: float | None, output_dir: Path, report) -> None:
    """``eval_results.json``: eval_loss (and its perplexity) over the eval examples."""
    started = time.time()
    loss = evaluate()
    runtime = time.time() - started
    metrics = {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "eval_runtime": round(runtime, 4),
        "eval_samples_per_second": round(num_examples / runtime, 3) if runtime else 0.0,
    }
    if epoch is not None:
        metrics["epoch"] = epoch
    write_results(output_dir, metrics, split="eval")
    report(f"eval_loss {loss:.4f} over {num_examples} examples (perplexity {metrics['perplexity']:.2f})")


def _predict(run: RunArguments, model: SpannedModel, tokenizer: Tokenizer, examples, output_dir: Path, report) -> None:
    """``generated_predictions.jsonl`` (prompt, predict, label per eval example) and ``predict_results.json``."""
    settings = sampling_settings(run.generating, run.training.seed)
    stop_ids = stop_token_ids(Path(run.model.model_name_or_path), model.last, tokenizer)
    started = time.time()
    rows = predictions(model, examples, tokenizer, settings, stop_ids)
    runtime = time.time() - started
    with (output_dir / PREDICTIONS_FILE).open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_results(
        output_dir,
        {
            "predict_runtime": round(runtime, 4),
            "predict_samples_per_second": round(len(rows) / runtime, 3) if runtime else 0.0,
        },
        split="predict",
    )
    report(f"{len(rows)} predictions written to {output_dir / PREDICTIONS_FILE}")


# --- checks, before anything loads ---------------------------------------------------------------


def check_arguments(run: RunArguments) -> ModelConfig:
    ft, train_args = run.finetuning, run.training
    if not (train_args.do_train or train_args.do_eval or train_args.do_predict):
        raise ChipspanError("nothing to do: add --do_train, --do_eval or --do_predict")
    _check_evaluation(run)
    tensorboard_wanted(train_args.report_to)
    for flag, value in (
        ("model_name_or_path", run.model.model_name_or_path),
        ("dataset", run.data.dataset),
        ("output_dir", train_args.output_dir),
    ):
        if not value:
            raise ChipspanError(f"--{flag} is required")
    if train_args.fp16 + train_args.bf16 + ft.pure_bf16 > 1:
        raise ChipspanError("choose one of --fp16, --bf16 and --pure_bf16")
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
    if train_args.logging_dir:
        check_output(train_args.logging_dir, "--logging_dir", inputs)
    check_finetuning_arguments(ft, config, run.model.adapter_name_or_path)
    return config


def _check_evaluation(run: RunArguments) -> None:
    """Evaluation settings: an eval set to use, and generation settings chipspan supports."""
    train_args, generating = run.training, run.generating
    if (
        train_args.do_train
        and run.data.val_size == 0
        and (train_args.eval_strategy != "no" or train_args.do_eval or train_args.do_predict)
    ):
        raise ChipspanError(
            "evaluating while training needs held-out rows: pass --val_size (a count or a fraction, e.g. 0.1)"
        )
    if train_args.do_predict and run.finetuning.stage != "sft":
        raise ChipspanError("--do_predict answers prompts: it needs --stage sft")
    if generating.num_beams != 1 or generating.repetition_penalty != 1.0:
        raise ChipspanError(
            "beam search and repetition penalties are not supported: use --num_beams 1 --repetition_penalty 1.0"
        )


def _placement(run: RunArguments, config: ModelConfig) -> tuple[Placement, int]:
    """The chips and their layers, and the micro-batches per batch, from the memory plan
    (chipspan.chips.plan.train_chips)."""
    device_type = run.chips.device or devices.default_device_type()
    chip_ids, span, chip_bytes = train_chips(run, config, device_type)
    devices.prepare_device_type(
        device_type, chip_ids[-1] + 1, emu_memory_limit=chip_bytes if device_type == "emu" else None
    )
    return Placement(tuple(devices.chip_devices(device_type, chip_ids)), tuple(span.layers)), span.micro_batches


def check_disk(
    run: RunArguments,
    config: ModelConfig,
    base_dtype: torch.dtype,
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
    if run.finetuning.finetuning_type == "lora":
        weights = trainable * 4  # the adapter alone, fp32
    else:
        weights = trainable * 4 + (total - trainable) * base_dtype.itemsize
    tokenizer_bytes = checkpoints.tokenizer_size(tokenizer)
    logs = steps // max(train_args.logging_steps, 1) + 1 + (steps if train_args.eval_strategy != "no" else 0)
    one = checkpoints.checkpoint_size(weights, trainable * 8, trained_tensors, tokenizer_bytes, logs)
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
    checkpoints.check_continues(chosen, settings, report)
    checkpoints.check_loadable(chosen)
    return chosen


def choose_precision(run: RunArguments, device_type: str, report: Callable[[str], None]):
    """(Precision, dtype of the frozen base) for --fp16/--bf16/--pure_bf16 on this device.

    --pure_bf16 keeps every weight in bf16 (trained ones too, see ``prepare_trainable``), no autocast.
    """
    train_args, ft = run.training, run.finetuning
    half = torch.float16 if train_args.fp16 else torch.bfloat16 if (train_args.bf16 or ft.pure_bf16) else None
    if half is None:
        return Precision(device_type), torch.float32
    if not devices.supports_half_compute(device_type):
        flag = "fp16" if train_args.fp16 else "pure_bf16" if ft.pure_bf16 else "bf16"
        report(
            f"note: --{flag} is ignored on {device_type}, which has no fast "
            "half-precision arithmetic: computing in fp32"
        )
        return Precision(device_type), torch.float32
    if ft.pure_bf16:
        return Precision(device_type), torch.bfloat16
    scaler = torch.amp.GradScaler(device_type) if half is torch.float16 else None
    base_dtype = torch.float32 if ft.finetuning_type == "full" else half
    return Precision(device_type, half, scaler), base_dtype


# --- pieces --------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: SpannedModel, args) -> torch.optim.AdamW:
    """AdamW as the HF Trainer builds it: no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for stage in model.stages:
        for name, param in stage.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if name.endswith("bias") or "norm" in name else decay).append(param)
    if not decay and not no_decay:
        raise ChipspanError("nothing is trainable; check --finetuning_type and its module settings")
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )


def _restore(
    folder: Path, model: SpannedModel, optimizer, scheduler, precision: Precision, fresh: TrainerState
) -> TrainerState:
    with checkpoints.restoring(folder):
        checkpoints.load_optimizer_state(model, optimizer, folder)
        scheduler.load_state_dict(checkpoints.read_saved(folder / checkpoints.SCHEDULER_FILE))
        checkpoints.restore_rng_state(checkpoints.read_saved(folder / checkpoints.RNG_FILE))
        if (folder / checkpoints.SCALER_FILE).is_file():
            precision.load_state_dict(checkpoints.read_saved(folder / checkpoints.SCALER_FILE))
    state = TrainerState.load(folder)
    state.max_steps = fresh.max_steps
    return state


def _report_placement(
    model: SpannedModel, placement: Placement, micro_batches: int, report: Callable[[str], None]
) -> None:
    trainable = sum(p.numel() for p in model.unique_parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.unique_parameters())
    pipelined = f", each batch in {micro_batches} micro-batches (GPipe)" if micro_batches > 1 else ""
    report(f"placement over {placement.num_chips} chip(s){pipelined}:")
    for line in placement.describe(model.config):
        report(f"  {line}")
    report(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")


def split_examples(run: RunArguments, data: DataSplit, report: Callable[[str], None]):
    """(train, eval) examples: without --do_train every row is evaluated; SFT packing applies to train."""
    if not run.training.do_train:
        return [], [*data.train, *data.eval]
    examples = data.train
    if run.finetuning.stage == "sft" and (run.data.packing or run.data.sft_packing):  # pt is already in blocks
        examples = list(examples)
        # a seed template with efficient_eos may make an example one token longer than cutoff_len
        block = max(run.data.cutoff_len, max(len(e.input_ids) for e in examples))
        packed = pack_examples(examples, block)
        report(packing_summary(len(examples), packed, block))
        examples = packed
    return examples, data.eval


def tensorboard_dir(run: RunArguments) -> Path:
    """Where TensorBoard events go: --logging_dir, else output_dir/runs."""
    return Path(run.training.logging_dir or Path(run.training.output_dir) / "runs")


def _chip_stats(placement: Placement) -> list[tuple[int, torch.device, dict[str, int]]]:
    """(chip index, device, allocated and peak bytes) of each distinct chip whose device reports memory."""
    found = []
    for i, device in enumerate(placement.devices):
        stats = devices.memory_stats(device) if device not in placement.devices[:i] else None
        if stats:
            found.append((i, device, stats))
    return found


def _chip_memory(placement: Placement) -> dict[str, int]:
    """Allocated and peak bytes of each chip now, for a log line (nothing where the device reports nothing)."""
    numbers = {}
    for i, _, stats in _chip_stats(placement):
        numbers[f"chip{i}_allocated_bytes"] = stats["allocated"]
        numbers[f"chip{i}_peak_bytes"] = stats["peak"]
    return numbers


def _peak_memory(placement: Placement, report: Callable[[str], None]) -> dict[str, int]:
    """Each chip's peak bytes where the device reports it, printed and returned for the results."""
    peaks = {}
    for i, device, stats in _chip_stats(placement):
        peaks[f"chip{i}_peak_memory_bytes"] = stats["peak"]
        report(f"chip {i} ({device}): peak memory {stats['peak'] / 2**30:.3f} GiB")
    return peaks
