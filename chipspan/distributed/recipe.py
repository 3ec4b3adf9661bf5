"""`chipspan train` with one process per chip (under torchrun), top to bottom.

    arguments -> checks -> layout (rank -> stage, replica) -> process group + mesh -> output_dir
    -> tokenizer -> data (rank 0 first: it fills the cache) -> this rank's stage weights
    -> what trains -> step (RankRunner: schedule, DDP) -> loop (with evaluation) -> outputs
    -> final evaluation

The checks of the single-process recipe (``chipspan.train.preflight``) run on every rank, before a
weight is read; so do the distributed ones (process count against stages × data_parallel, schedule,
micro-batches), so every rank stops with the same one-line error. The step, the loop, checkpoints
and outputs are the single process's (``chipspan.train.training``), with this rank's stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from chipspan import devices
from chipspan.args import RunArguments
from chipspan.chips.job import quant_settings
from chipspan.chips.plan import stage_span
from chipspan.data.loader import load_dataset_split
from chipspan.distributed.checkpoints import RankWriter
from chipspan.distributed.mesh import Layout, environment_world, plan_layout, rank_device, start
from chipspan.distributed.pipeline import VIRTUAL_STAGES, check_schedule
from chipspan.distributed.runner import RankRunner
from chipspan.distributed.stage import load_stage
from chipspan.distributed.trainable import prepare_stages
from chipspan.errors import ChipspanError
from chipspan.models.tokenizer import Tokenizer
from chipspan.precision import Precision, choose_precision
from chipspan.quant import quantized_summary
from chipspan.train import checkpoints, preflight
from chipspan.train.loop import total_steps
from chipspan.train.step import eval_loss
from chipspan.train.training import final_evaluation, train_and_save


def run_distributed_train(run: RunArguments, report: Callable[[str], None] = print) -> Path:
    """Train this rank's stages as ``run`` says; returns the output folder."""
    model_args, ft_args, train_args = run.model, run.finetuning, run.training
    config = preflight.check_arguments(run)
    _check_supported(run)
    check_schedule(run.chips.pipeline_schedule, train_args.micro_batches, train_args.per_device_train_batch_size)
    rank, world, local_rank, local_world = environment_world()
    layout = plan_layout(world, rank, run.chips.data_parallel, VIRTUAL_STAGES[run.chips.pipeline_schedule])
    if layout.num_stages > config.num_hidden_layers:
        raise ChipspanError(
            f"{layout.num_stages} pipeline stages but the model has only {config.num_hidden_layers} "
            "decoder layers: use fewer processes or more --data_parallel"
        )
    device = rank_device(run.chips.device or devices.default_device_type(), run.chips.chips, local_rank, local_world)
    span = stage_span(run, config, layout.num_stages, device)  # refuses what the plan says will not fit
    run = replace(run, training=replace(train_args, micro_batches=span.micro_batches))
    train_args = run.training
    output_dir = Path(train_args.output_dir)
    say = report if layout.writes_outputs else (lambda _: None)
    for notice in run.notices:
        say(notice)
    settings = checkpoints.run_settings(run, config)
    checkpoints.check_outputs_free(output_dir)
    resume = preflight.resume_point(run, settings, say)
    mesh = start(layout, device, train_args.ddp_timeout)

    tokenizer = Tokenizer.from_folder(model_args.model_name_or_path)
    data = _load_data_rank_zero_first(run, tokenizer, layout)
    say(data.summary())
    examples, eval_examples = preflight.split_examples(run, data, say)
    preflight.check_vocabulary(tokenizer, config, run.data.template, data, say)
    choice = choose_precision(run, device.type)
    if choice.notice():
        say(choice.notice())
    steps = total_steps(len(examples), train_args, layout.data)
    checkpoints.check_steps_left(resume, steps, output_dir)
    preflight.check_disk(run, config, choice, tokenizer, steps, say)

    preflight.seed_everything(train_args.seed)
    lora = ft_args.finetuning_type == "lora"
    weights = resume if (resume and not lora) else Path(model_args.model_name_or_path)
    quant = quant_settings(run)
    pieces = [load_stage(weights, config, span.layers, s, choice.base_dtype, device, quant) for s in layout.stages]
    for piece in pieces:
        piece.gradient_checkpointing = not train_args.disable_gradient_checkpointing
    adapter = resume if (resume and lora) else model_args.adapter_name_or_path
    prepare_stages(pieces, config, ft_args, str(adapter) if adapter else None, choice.trained_dtype)
    quantized = quantized_summary(pieces)
    if quantized:
        say(f"rank's stages: {quantized}")
    say(
        f"{world} processes: {layout.pipeline} pipeline rank(s) x {layout.data} data-parallel replica(s), "
        f"{layout.num_stages} stages ({run.chips.pipeline_schedule}, {train_args.micro_batches} micro-batch(es) "
        "per batch)"
    )
    if layout.writes_outputs:
        checkpoints.prepare_output_dir(output_dir, train_args.overwrite_output_dir and not resume)

    precision = Precision(choice)
    runner = RankRunner(
        layout,
        device,
        mesh,
        pieces,
        run.chips.pipeline_schedule,
        train_args.micro_batches * train_args.gradient_accumulation_steps,
        train_args.per_device_train_batch_size,
        tokenizer.pad_token_id,
        choice.base_dtype,
        precision,
    )

    def evaluate() -> float:
        return eval_loss(runner, eval_examples, tokenizer.pad_token_id, train_args.per_device_eval_batch_size)

    files = checkpoints.RunFiles(
        output_dir, tokenizer, model_args.model_name_or_path, lora, settings, train_args.save_only_model
    )
    writer = RankWriter(pieces, layout, device, files)
    metrics = train_and_save(
        run, runner, writer, precision, examples, steps, resume, evaluate, say, replicas=layout.data
    )
    if train_args.do_eval:  # every rank runs the pipeline; rank 0 writes eval_results.json
        if layout.writes_outputs:
            final_evaluation(evaluate, len(eval_examples), metrics.get("epoch"), output_dir, say)
        else:
            evaluate()
    dist.barrier()
    dist.destroy_process_group()
    return output_dir


def _check_supported(run: RunArguments) -> None:
    train_args = run.training
    if not train_args.do_train or train_args.do_predict:
        raise ChipspanError(
            "one process per chip trains (and evaluates while training): run --do_predict, or "
            "--do_eval alone, in one process"
        )


def _load_data_rank_zero_first(run: RunArguments, tokenizer: Tokenizer, layout: Layout):
    """The encoded dataset; rank 0 encodes first and fills the cache, the other ranks then read it."""

    def load():
        return load_dataset_split(run.data, tokenizer, run.finetuning.stage, run.training.seed)

    data = load() if layout.rank == 0 else None
    dist.barrier()
    return data if data is not None else load()
