"""The training loop of one rank: global batches -> its replica's rows -> pipeline -> clip -> AdamW.

Every rank draws the same global batches (``chipspan.train.loop.micro_batches`` over
per_device_train_batch_size × data_parallel examples, the same seed), so step N sees what a single
process with that batch size sees. Replica r takes rows [r·B, (r+1)·B) of each accumulation batch;
the step's accumulation batches, padded to one length, run as one pipeline schedule of
micro_batches × gradient_accumulation_steps micro-batches. Each micro-batch's token-loss sum is
weighted by 1 / (trained tokens of its global batch × accumulation steps), which makes the step's
loss and gradients those of the single process: the token mean of each batch, averaged over the
accumulation steps.

With fp16 loss scaling (``RankTraining.scaler``) the last stage multiplies its loss by the scale,
every rank divides its gradients by it, and the ranks agree (one all-reduce) on whether the step
overflowed: then every rank skips it — weights and learning rate stay — and halves its scale.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from chipspan.args import TrainingArguments
from chipspan.data import collate
from chipspan.data.encode import IGNORE_INDEX
from chipspan.distributed.gradients import clip_global_norm, sum_tied_gradients
from chipspan.distributed.mesh import Layout
from chipspan.distributed.pipeline import PipelineRunner
from chipspan.distributed.scaling import LossScaler
from chipspan.train.health import NonFiniteGuard
from chipspan.train.loop import evaluation_due, micro_batches, steps_per_epoch
from chipspan.train.reporting import TrainerState, TrainLog, record_evaluation, train_metrics
from chipspan.train.schedule import lr_factor, warmup_steps_for


@dataclass
class RankTraining:
    """What one rank trains with."""

    layout: Layout
    device: torch.device
    runner: PipelineRunner
    trained: list[nn.Parameter]  # this rank's unique trained parameters (a tied head copy left out)
    tied: list[nn.Parameter]  # this rank's copies of embeddings tied across stages
    head_copies: list[nn.Parameter]  # the tied head copy when this rank holds the last stage
    optimizer: torch.optim.Optimizer | None  # None when nothing trains on this rank's stages
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    pipeline_group: dist.ProcessGroup
    data_group: dist.ProcessGroup
    tied_group: dist.ProcessGroup | None
    scaler: LossScaler | None = None  # fp16 dynamic loss scaling, the same on every rank


def global_arguments(args: TrainingArguments, data_parallel: int) -> TrainingArguments:
    """``args`` with the batch of all replicas together: what step counts and data order follow."""
    return replace(args, per_device_train_batch_size=args.per_device_train_batch_size * data_parallel)


def train_pipeline(
    rank: RankTraining,
    examples: list,
    pad_id: int,
    args: TrainingArguments,
    state: TrainerState,
    log: TrainLog | None,
    save: Callable[[int], None],
    report: Callable[[str], None],
    evaluate: Callable[[], float] | None = None,
) -> dict[str, float]:
    """Run from ``state.global_step`` to ``state.max_steps``; returns the train metrics (on every rank).

    ``log`` is None except on the rank that writes the outputs. ``evaluate`` (the eval loss, every rank
    taking part) runs when ``--eval_strategy`` says, as in the single-process loop."""
    layout, accumulation = rank.layout, args.gradient_accumulation_steps
    whole = global_arguments(args, layout.data)
    per_epoch = steps_per_epoch(len(examples), whole)
    batches = micro_batches(
        examples, whole.per_device_train_batch_size, args.seed, pad_id, skip=state.global_step * accumulation
    )
    warmup = warmup_steps_for(state.max_steps, args.warmup_steps, args.warmup_ratio)
    first_step, started = state.global_step, time.time()
    losses_since_log: list[float] = []
    total_loss, tokens = 0.0, 0
    guard = NonFiniteGuard(args.learning_rate, scaled=rank.scaler is not None)
    for module in rank.runner.modules:
        module.train()
    while state.global_step < state.max_steps:
        step_batches = [next(batches) for _ in range(accumulation)]
        step_tokens = sum(int(b["attention_mask"].count_nonzero()) for b in step_batches)
        rows = replica_rows(
            step_batches, layout, args.per_device_train_batch_size, pad_id, rank.data_group, rank.device
        )
        scaler = rank.scaler
        local_loss = rank.runner.step(rows, scaler.scale if scaler else 1.0)
        sum_tied_gradients(rank.tied, rank.tied_group)
        overflowed = scaler is not None and scaler.unscale(
            [p.grad for p in rank.trained + rank.head_copies if p.grad is not None], rank.device
        )
        grad_norm = clip_global_norm(
            rank.trained, rank.head_copies, args.max_grad_norm, rank.pipeline_group, rank.device
        )
        step_loss = _sum_over_ranks(local_loss or 0.0, rank.device)  # only last stages add theirs
        applied = guard.allows(state.global_step + 1, step_loss, grad_norm, report) and not overflowed
        if rank.optimizer is not None:
            if applied:
                rank.optimizer.step()
                rank.scheduler.step()
            rank.optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update(overflowed)
        state.finish_step(per_epoch, step_tokens)
        tokens += step_tokens
        losses_since_log.append(step_loss)
        total_loss += step_loss
        elapsed = time.time() - started
        if log is not None and (state.global_step % args.logging_steps == 0 or state.global_step == state.max_steps):
            scheduler_steps = state.global_step - (scaler.skipped_steps if scaler else 0) - guard.skipped_steps
            learning_rate = args.learning_rate * lr_factor(
                args.lr_scheduler_type, scheduler_steps, state.max_steps, warmup
            )
            entry = {
                "loss": round(sum(losses_since_log) / len(losses_since_log), 4),
                "learning_rate": learning_rate,
                "epoch": round(state.epoch, 4),
                "grad_norm": grad_norm,
                "step": state.global_step,
            }
            if scaler is not None:
                entry["skipped_steps"] = scaler.skipped_steps
            state.log_history.append(entry)
            record = log.write(
                state.global_step,
                entry["epoch"],
                entry["loss"],
                entry["learning_rate"],
                tokens_per_second=round(tokens / elapsed, 1) if elapsed > 0 else 0.0,
                **{k: v for k, v in entry.items() if k == "skipped_steps"},
            )
            report(
                f"step {record['current_steps']}/{record['total_steps']}  loss {record['loss']:.4f}  "
                f"lr {record['learning_rate']:.3e}  {record['tokens_per_second']:.0f} tok/s"
            )
        if state.global_step % args.logging_steps == 0:
            losses_since_log = []
        if evaluate is not None and evaluation_due(state.global_step, per_epoch, args):
            eval_loss = evaluate()
            if log is not None:
                record_evaluation(state, log, eval_loss, report)
        if args.save_steps > 0 and state.global_step % args.save_steps == 0 and state.global_step < state.max_steps:
            save(state.global_step)
    return train_metrics(
        state.epoch,
        total_loss,
        state.global_step - first_step,
        time.time() - started,
        accumulation * whole.per_device_train_batch_size,
        tokens,
    )


def pipeline_eval_loss(rank: RankTraining, examples: list, pad_id: int, batch_size: int) -> float:
    """``chipspan.train.evaluate.eval_loss`` through the pipeline (on every rank): each batch of
    ``batch_size`` examples, in order, counts its token-mean loss once per example. Replica r runs
    batches r, r + D, …; the totals of the last stages are summed over every rank."""
    for module in rank.runner.modules:
        module.eval()
    total = 0.0
    for number, start in enumerate(range(0, len(examples), batch_size)):
        if number % rank.layout.data != rank.layout.replica:
            continue
        chunk = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        batch = collate(chunk, pad_id)
        trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        batch["loss_weight"] = torch.full((len(chunk),), 1.0 / max(trained, 1))  # sum -> token mean
        loss = rank.runner.forward_only(batch)
        total += loss * len(chunk) if loss is not None else 0.0
    for module in rank.runner.modules:
        module.train()
    return _sum_over_ranks(total, rank.device) / len(examples)


def replica_rows(
    step_batches: list[dict[str, torch.Tensor]],
    layout: Layout,
    batch_size: int,
    pad_id: int,
    data_group: dist.ProcessGroup,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """This replica's rows of the step's global batches, padded to one length and stacked:
    input_ids, attention_mask, labels (accumulation · B, s) and loss_weight (accumulation · B,) fp32."""
    length = max(b["input_ids"].shape[1] for b in step_batches)
    rows = slice(layout.replica * batch_size, (layout.replica + 1) * batch_size)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    parts = {
        key: [F.pad(b[key][rows], (0, length - b[key].shape[1]), value=value) for b in step_batches]
        for key, value in fill.items()
    }
    counts = torch.tensor(
        [int((labels[:, 1:] != IGNORE_INDEX).sum()) for labels in parts["labels"]], dtype=torch.int64, device=device
    )
    dist.all_reduce(counts, group=data_group)  # trained tokens of each global batch
    weights = 1.0 / (counts.cpu().clamp_min(1).double() * len(step_batches))
    stacked = {key: torch.cat(values) for key, values in parts.items()}
    stacked["loss_weight"] = weights.float().repeat_interleave(batch_size)
    return stacked


def _sum_over_ranks(value: float, device: torch.device) -> float:
    total = torch.tensor(value, dtype=torch.float32, device=device)
    dist.all_reduce(total)
    return float(total)
