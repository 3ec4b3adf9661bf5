"""`chipspan train` with one process per chip (under torchrun), top to bottom.

    arguments -> checks -> layout (rank -> stage, replica) -> process group + mesh -> output_dir
    -> tokenizer -> data (rank 0 first: it fills the cache) -> this rank's stage weights
    -> what trains -> DDP over replicas -> optimizer -> pipeline loop (with evaluation) -> outputs (rank 0)
    -> final evaluation

The checks of the single-process recipe run on every rank, before a weight is read; so do the
distributed ones (process count against stages × data_parallel, schedule, micro-batches), so every
rank stops with the same one-line error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from chipspan import devices
from chipspan.args import RunArguments
from chipspan.chips.plan import stage_span
from chipspan.data.loader import load_dataset_split
from chipspan.distributed import checkpoints as stage_checkpoints
from chipspan.distributed.gradients import data_parallel, tied_copy
from chipspan.distributed.loop import RankTraining, global_arguments, pipeline_eval_loss, train_pipeline
from chipspan.distributed.mesh import Layout, environment_world, plan_layout, rank_device, start, tied_group
from chipspan.distributed.pipeline import VIRTUAL_STAGES, PipelineRunner, check_schedule
from chipspan.distributed.scaling import LossScaler
from chipspan.distributed.stage import PipelinePiece, load_stage
from chipspan.distributed.trainable import prepare_stages
from chipspan.errors import ChipspanError
from chipspan.models.tokenizer import Tokenizer
from chipspan.train import checkpoints, recipe
from chipspan.train.health import nonfinite_weight, refuse_nonfinite_weights
from chipspan.train.loop import total_steps
from chipspan.train.reporting import LOG_FILE, TrainerState, TrainLog, tensorboard_wanted, truncate_log
from chipspan.train.schedule import build_scheduler, warmup_steps_for


def run_distributed_train(run: RunArguments, report: Callable[[str], None] = print) -> Path:
    """Train this rank's stages as ``run`` says; returns the output folder."""
    model_args, ft_args, train_args = run.model, run.finetuning, run.training
    config = recipe.check_arguments(run)
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
    settings = checkpoints.run_settings(run, config)
    checkpoints.check_outputs_free(output_dir)
    resume = recipe.resume_point(run, settings, say)
    mesh = start(layout, device)

    tokenizer = Tokenizer.from_folder(model_args.model_name_or_path)
    data = _load_data_rank_zero_first(run, tokenizer, layout)
    say(data.stats.summary())
    examples, eval_examples = recipe.split_examples(run, data, say)
    if tokenizer.vocab_size > config.vocab_size:
        raise ChipspanError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{config.vocab_size}; pick a template the tokenizer knows"
        )
    precision, base_dtype = recipe.choose_precision(run, device.type, say)
    steps = total_steps(len(examples), global_arguments(train_args, layout.data))
    recipe.check_disk(run, config, base_dtype, tokenizer, steps, say)

    recipe.seed_everything(train_args.seed)
    weights = resume if (resume and ft_args.finetuning_type != "lora") else Path(model_args.model_name_or_path)
    pieces = [load_stage(weights, config, span.layers, s, base_dtype, device) for s in layout.stages]
    for piece in pieces:
        piece.gradient_checkpointing = not train_args.disable_gradient_checkpointing
    adapter = resume if (resume and ft_args.finetuning_type == "lora") else model_args.adapter_name_or_path
    trained_dtype = torch.bfloat16 if ft_args.pure_bf16 and base_dtype == torch.bfloat16 else torch.float32
    prepare_stages(pieces, config, ft_args, str(adapter) if adapter else None, trained_dtype)
    say(
        f"{world} processes: {layout.pipeline} pipeline rank(s) x {layout.data} data-parallel replica(s), "
        f"{layout.num_stages} stages ({run.chips.pipeline_schedule}, {train_args.micro_batches} micro-batch(es) "
        f"per batch)"
    )

    rank_training = _rank_training(run, layout, device, mesh, pieces, base_dtype, steps)
    if precision.scaler is not None:  # fp16: one loss scale that every rank agrees on
        rank_training.scaler = LossScaler.like(precision.scaler)
    state = TrainerState(
        max_steps=steps,
        num_train_epochs=train_args.num_train_epochs,
        logging_steps=train_args.logging_steps,
        save_steps=train_args.save_steps,
        train_batch_size=train_args.per_device_train_batch_size,
    )
    if resume:
        state = _restore(resume, pieces, rank_training, state)
        say(f"resuming from {resume} at step {state.global_step}")
    if layout.writes_outputs:
        checkpoints.prepare_output_dir(output_dir, train_args.overwrite_output_dir and not resume)
        truncate_log(output_dir / LOG_FILE, state.global_step)  # drop lines of the run being replaced
    dist.barrier()

    base_model, is_lora = model_args.model_name_or_path, ft_args.finetuning_type == "lora"

    def trained_weights_finite(where: str) -> None:
        """Every rank agrees: one rank's inf/NaN stops them all before anything is written."""
        name = nonfinite_weight(p for piece in pieces for p in piece.named_parameters())
        flag = torch.tensor(float(name is not None), device=device)
        dist.all_reduce(flag)
        refuse_nonfinite_weights(name or ("of another stage" if float(flag) else None), where)

    def save(step: int) -> None:
        trained_weights_finite(f"checkpoint-{step}")
        scaler = rank_training.scaler
        written = stage_checkpoints.save_checkpoint(
            pieces,
            rank_training.optimizer,
            rank_training.scheduler,
            layout,
            output_dir,
            step,
            tokenizer,
            state,
            base_model,
            is_lora,
            settings,
            scaler.state_dict() if scaler is not None else None,
        )
        if written is not None:
            checkpoints.remove_old_checkpoints(output_dir, train_args.save_total_limit, written)
        dist.barrier()

    say(
        f"training {len(examples)} examples for {steps} steps (batch {train_args.per_device_train_batch_size} "
        f"x {layout.data} replica(s) x {train_args.gradient_accumulation_steps} accumulation)"
    )

    def evaluate() -> float:
        return pipeline_eval_loss(
            rank_training, eval_examples, tokenizer.pad_token_id, train_args.per_device_eval_batch_size
        )

    log = None
    if layout.writes_outputs:
        tensorboard = recipe.tensorboard_dir(run) if tensorboard_wanted(train_args.report_to) else None
        log = TrainLog(output_dir, steps, state.global_step, tensorboard_dir=tensorboard)
    try:
        metrics = train_pipeline(
            rank_training,
            examples,
            tokenizer.pad_token_id,
            train_args,
            state,
            log,
            save,
            say,
            evaluate if train_args.eval_strategy != "no" else None,
        )
    finally:
        if log is not None:
            log.close()

    trained_weights_finite(f"the final {'adapter' if is_lora else 'model'}")
    stage_checkpoints.write_weights(pieces, layout, output_dir, base_model, is_lora)
    if layout.writes_outputs:
        recipe.write_run_outputs(output_dir, tokenizer, state, metrics, ft_args.plot_loss, is_lora, say)
    if train_args.do_eval:  # every rank runs the pipeline; rank 0 writes eval_results.json
        if layout.writes_outputs:
            recipe.final_evaluation(evaluate, len(eval_examples), metrics.get("epoch"), output_dir, say)
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


def _rank_training(
    run: RunArguments, layout: Layout, device: torch.device, mesh, pieces, base_dtype, steps: int
) -> RankTraining:
    """The pipeline runner, DDP wrappers, optimizer and scheduler of this rank."""
    train_args = run.training
    data_group, pipeline_group = mesh.get_group("data"), mesh.get_group("pipeline")
    trains = any(p.requires_grad for piece in pieces for p in piece.parameters())
    modules = [PipelinePiece(piece, base_dtype) for piece in pieces]
    if layout.data > 1 and trains:
        modules = [data_parallel(module, data_group, device) for module in modules]
    runner = PipelineRunner(
        modules,
        layout.stages,
        layout.num_stages,
        run.chips.pipeline_schedule,
        train_args.micro_batches * train_args.gradient_accumulation_steps,
        device,
        pipeline_group,
        pieces[0].config.hidden_size,
        base_dtype,
    )
    tied = [copy for piece in pieces if (copy := tied_copy(piece, layout.num_stages)) is not None]
    group = tied_group(layout) if pieces[0].config.tie_word_embeddings and layout.num_stages > 1 else None
    head_copies = [
        copy
        for piece in pieces
        if piece.model.embed_tokens is None and (copy := tied_copy(piece, layout.num_stages)) is not None
    ]  # counted once, as the embedding
    skip = {id(copy) for copy in head_copies}
    unique = {id(p): p for piece in pieces for p in piece.parameters() if p.requires_grad and id(p) not in skip}
    optimizer = scheduler = None
    if trains:
        optimizer = recipe.build_optimizer(SimpleNamespace(stages=pieces), train_args)
        scheduler = build_scheduler(
            optimizer,
            train_args.lr_scheduler_type,
            steps,
            warmup_steps_for(steps, train_args.warmup_steps, train_args.warmup_ratio),
        )
    return RankTraining(
        layout,
        device,
        runner,
        list(unique.values()),
        tied,
        head_copies,
        optimizer,
        scheduler,
        pipeline_group,
        data_group,
        group,
    )


def _restore(folder: Path, pieces, rank_training: RankTraining, fresh: TrainerState) -> TrainerState:
    with checkpoints.restoring(folder):
        if rank_training.optimizer is not None:
            stage_checkpoints.load_stage_optimizer(pieces, rank_training.optimizer, rank_training.scheduler, folder)
        if rank_training.scaler is not None and (folder / checkpoints.SCALER_FILE).is_file():
            rank_training.scaler.load_state_dict(checkpoints.read_saved(folder / checkpoints.SCALER_FILE))
        checkpoints.restore_rng_state(checkpoints.read_saved(folder / checkpoints.RNG_FILE))
    state = TrainerState.load(folder)
    state.max_steps = fresh.max_steps
    return state
