"""`chipspan train` in one process, every chip in it, top to bottom.

    arguments -> checks -> placement -> output_dir -> tokenizer -> data -> weights on the chips
    -> what trains -> step (ChipsRunner) -> loop (with evaluation) -> outputs -> final evaluation
    -> predictions

Everything that can be wrong with the user's input is found before a single weight is read
(``chipspan.train.preflight``, shared with the torchrun ranks of ``chipspan.distributed.recipe``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from chipspan import devices
from chipspan.args import RunArguments
from chipspan.chips.job import quant_settings
from chipspan.chips.placement import Placement
from chipspan.chips.plan import train_chips
from chipspan.chips.runner import ChipsRunner
from chipspan.chips.span import SpannedModel
from chipspan.data.loader import load_dataset_split
from chipspan.infer.engine import stop_token_ids
from chipspan.infer.generate import sampling_settings
from chipspan.models.config import ModelConfig
from chipspan.models.tokenizer import Tokenizer
from chipspan.precision import Precision, choose_precision
from chipspan.quant import QuantizedLinear, quantized_summary
from chipspan.train import checkpoints, preflight
from chipspan.train.evaluate import predictions
from chipspan.train.finetune import prepare_trainable
from chipspan.train.loop import total_steps
from chipspan.train.reporting import PREDICTIONS_FILE, write_results
from chipspan.train.step import eval_loss
from chipspan.train.training import LocalWriter, final_evaluation, train_and_save


def run_train(run: RunArguments, report: Callable[[str], None] = print) -> Path:
    """Train, evaluate and/or predict as ``run`` says; returns the output folder."""
    model_args, data_args, ft_args, train_args = run.model, run.data, run.finetuning, run.training
    for notice in run.notices:
        report(notice)
    config = preflight.check_arguments(run)
    placement, micro_batches = _placement(run, config)
    run = replace(run, training=replace(run.training, micro_batches=micro_batches))
    train_args = run.training
    output_dir = Path(train_args.output_dir)
    settings = checkpoints.run_settings(run, config)
    checkpoints.check_outputs_free(output_dir)
    resume = preflight.resume_point(run, settings, report) if train_args.do_train else None
    tokenizer = Tokenizer.from_folder(model_args.model_name_or_path)
    data = load_dataset_split(data_args, tokenizer, ft_args.stage, train_args.seed)
    report(data.summary())
    examples, eval_examples = preflight.split_examples(run, data, report)
    preflight.check_vocabulary(tokenizer, config, data_args.template, data, report)
    choice = choose_precision(run, placement.devices[0].type)
    if choice.notice():
        report(choice.notice())
    steps = total_steps(len(examples), train_args) if train_args.do_train else 0
    if train_args.do_train:
        checkpoints.check_steps_left(resume, steps, output_dir)
        preflight.check_disk(run, config, choice, tokenizer, steps, report)

    preflight.seed_everything(train_args.seed)
    lora = ft_args.finetuning_type == "lora"
    weights = resume if (resume and not lora) else Path(model_args.model_name_or_path)
    model = SpannedModel.load(weights, placement, choice.base_dtype, quant_settings(run))
    for stage in model.stages:
        stage.gradient_checkpointing = not train_args.disable_gradient_checkpointing
    adapter = resume if (resume and lora) else model_args.adapter_name_or_path
    prepare_trainable(
        list(model.stages), ft_args, adapter=str(adapter) if adapter else None, trained_dtype=choice.trained_dtype
    )
    _report_placement(model, placement, train_args.micro_batches, report)
    checkpoints.prepare_output_dir(output_dir, train_args.do_train and train_args.overwrite_output_dir and not resume)

    precision = Precision(choice)
    runner = ChipsRunner(model, train_args.micro_batches, precision.autocast)

    def evaluate() -> float:
        return eval_loss(runner, eval_examples, tokenizer.pad_token_id, train_args.per_device_eval_batch_size)

    metrics: dict[str, float] = {}
    if train_args.do_train:
        files = checkpoints.RunFiles(
            output_dir, tokenizer, model_args.model_name_or_path, lora, settings, train_args.save_only_model
        )
        writer = LocalWriter(list(model.stages), files)
        memory, peaks = (lambda: _chip_memory(placement)), (lambda: _peak_memory(placement, report))
        metrics = train_and_save(
            run, runner, writer, precision, examples, steps, resume, evaluate, report, memory, peaks
        )
    if train_args.do_eval:
        final_evaluation(evaluate, len(eval_examples), metrics.get("epoch"), output_dir, report)
    if train_args.do_predict:
        _predict(run, model, tokenizer, eval_examples, output_dir, report)
    return output_dir


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


def _placement(run: RunArguments, config: ModelConfig) -> tuple[Placement, int]:
    """The chips and their layers, and the micro-batches per batch, from the memory plan
    (chipspan.chips.plan.train_chips)."""
    device_type = run.chips.device or devices.default_device_type()
    chip_ids, span, chip_bytes = train_chips(run, config, device_type)
    devices.prepare_device_type(
        device_type, chip_ids[-1] + 1, emu_memory_limit=chip_bytes if device_type == "emu" else None
    )
    return Placement(tuple(devices.chip_devices(device_type, chip_ids)), tuple(span.layers)), span.micro_batches


def _report_placement(
    model: SpannedModel, placement: Placement, micro_batches: int, report: Callable[[str], None]
) -> None:
    trainable = sum(p.numel() for p in model.unique_parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.unique_parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    pipelined = f", each batch in {micro_batches} micro-batches (GPipe)" if micro_batches > 1 else ""
    report(f"placement over {placement.num_chips} chip(s){pipelined}:")
    for line in placement.describe(model.config):
        report(f"  {line}")
    report(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
    quantized = quantized_summary(list(model.stages))
    if quantized:
        report(quantized)


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
