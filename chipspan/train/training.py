"""What every placement does around the loop, written once: AdamW and its schedule (stepped inside
backward with --optimizer_in_bwd), resume, the log, checkpoints at ``save_steps``, a refusal to
write inf/NaN weights, and the final outputs.

What differs between one process and a torchrun rank is how its stages reach the disk: a *writer*
(``LocalWriter`` here, ``chipspan.distributed.checkpoints.RankWriter`` for a rank) says whether this
process writes the logs and results, makes all processes agree, and writes checkpoints and the
final weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from chipspan.args import RunArguments
from chipspan.chips.job import rounds_stochastically
from chipspan.models.decoder import CausalLM
from chipspan.models.tokenizer import Tokenizer
from chipspan.optim.in_backward import StepInBackward
from chipspan.precision import Precision
from chipspan.train import checkpoints
from chipspan.train.health import nonfinite_weight, refuse_nonfinite_weights
from chipspan.train.loop import train
from chipspan.train.optim import build_optimizer, settle
from chipspan.train.reporting import (
    LOG_FILE,
    TrainerState,
    TrainLog,
    open_trackers,
    plot_metric,
    truncate_log,
    write_results,
)
from chipspan.train.step import TrainStep


class LocalWriter:
    """One process holding every stage: it writes everything itself."""

    writes_outputs = True

    def __init__(self, stages: list[CausalLM], files: checkpoints.RunFiles):
        self.stages, self.files = stages, files

    def agree_nonfinite(self, name: str | None) -> str | None:
        return name

    def checkpoint(self, step: int, optimizer, scheduler, state: TrainerState, precision_state: dict | None) -> Path:
        return checkpoints.save_checkpoint(self.files, step, self.stages, optimizer, scheduler, state, precision_state)

    def final_weights(self) -> None:
        files = self.files
        checkpoints.save_trained_weights(self.stages, files.output_dir, files.base_model, files.is_lora)

    def barrier(self) -> None:
        pass


def train_and_save(
    run: RunArguments,
    runner,
    writer,
    precision: Precision,
    examples: list,
    steps: int,
    resume: Path | None,
    evaluate: Callable[[], float],
    report: Callable[[str], None],
    memory: Callable[[], dict[str, int]] = dict,
    peaks: Callable[[], dict[str, int]] = dict,
    replicas: int = 1,
) -> dict[str, float]:
    """Train the writer's stages (run by ``runner``: ``chipspan.train.step``) for ``steps``
    optimizer steps, from ``resume`` when given, and write what a run leaves; returns the train
    metrics. ``evaluate``: the eval loss, run as --eval_strategy says; ``memory``: the per-chip
    numbers of each log line; ``peaks``: those of the results."""
    train_args, stages, files = run.training, writer.stages, writer.files
    output_dir, tokenizer, is_lora = files.output_dir, files.tokenizer, files.is_lora
    rounding = rounds_stochastically(run, precision.choice)
    optimizer, scheduler = build_optimizer(stages, train_args, steps, stochastic_rounding=rounding)
    in_backward = StepInBackward(optimizer, runner) if train_args.optimizer_in_bwd else None
    step = TrainStep(
        runner, optimizer, scheduler, precision, train_args.max_grad_norm, train_args.learning_rate, in_backward
    )
    state = TrainerState(
        max_steps=steps,
        num_train_epochs=train_args.num_train_epochs,
        logging_steps=train_args.logging_steps,
        save_steps=train_args.save_steps,
        train_batch_size=train_args.per_device_train_batch_size,
    )
    if resume:
        state = checkpoints.restore_training(resume, stages, optimizer, scheduler, precision, state)
        report(f"resuming from {resume} at step {state.global_step}")
    if writer.writes_outputs:
        truncate_log(output_dir / LOG_FILE, state.global_step)  # drop lines of the run being replaced
    writer.barrier()

    def trained_weights_finite(where: str) -> None:
        name = nonfinite_weight(p for stage in stages for p in stage.named_parameters())
        refuse_nonfinite_weights(writer.agree_nonfinite(name), where)

    def save(number: int) -> None:
        settle(optimizer)
        trained_weights_finite(f"checkpoint-{number}")
        written = writer.checkpoint(number, optimizer, scheduler, state, precision.state_dict())
        if written is not None:
            checkpoints.remove_old_checkpoints(output_dir, train_args.save_total_limit, written)
        writer.barrier()

    accumulation = train_args.gradient_accumulation_steps
    side_by_side = f" x {replicas} replica(s)" if replicas > 1 else ""
    report(
        f"training {len(examples)} examples for {steps} steps (batch {train_args.per_device_train_batch_size}"
        f"{side_by_side} x {accumulation} accumulation)"
    )
    log = None
    if writer.writes_outputs:
        log = TrainLog(output_dir, steps, state.global_step, trackers=open_trackers(run))
    try:
        pad_id = tokenizer.pad_token_id
        during = evaluate if train_args.eval_strategy != "no" else None
        metrics = train(step, examples, pad_id, train_args, state, log, save, report, during, memory, replicas)
    finally:
        if log is not None:
            log.close()
    metrics.update(peaks())
    settle(optimizer)
    trained_weights_finite(f"the final {'adapter' if is_lora else 'model'}")
    writer.final_weights()
    if writer.writes_outputs:
        write_run_outputs(output_dir, tokenizer, state, metrics, run.finetuning.plot_loss, is_lora, report)
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
