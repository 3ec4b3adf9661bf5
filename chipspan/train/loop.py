"""The training loop, the same for every placement: steps -> log -> evaluate -> save.

Every optimizer step consumes ``gradient_accumulation_steps`` batches from one stream that runs
across epochs; each epoch visits the examples in an order drawn from ``seed + epoch``. So step N
always sees the same batches, which is what makes a resumed run continue exactly. Under torchrun
every rank draws the same global batches (per_device_train_batch_size × data-parallel replicas
examples each) and the runner takes its replica's rows.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator

import torch

from chipspan.args import TrainingArguments
from chipspan.data import Example, collate
from chipspan.train.reporting import TrainerState, TrainLog, record_evaluation, train_metrics
from chipspan.train.step import TrainStep


def steps_per_epoch(num_examples: int, args: TrainingArguments, replicas: int = 1) -> int:
    """Optimizer steps in one pass over the data (at least 1), ``replicas`` batches side by side."""
    batches = math.ceil(num_examples / (args.per_device_train_batch_size * replicas))
    return max(batches // args.gradient_accumulation_steps, 1)


def total_steps(num_examples: int, args: TrainingArguments, replicas: int = 1) -> int:
    if args.max_steps > 0:
        return args.max_steps
    return math.ceil(args.num_train_epochs * steps_per_epoch(num_examples, args, replicas))


def batch_stream(
    examples: list[Example], batch_size: int, seed: int, pad_id: int, skip: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless padded batches of ``batch_size`` examples, epoch after epoch, starting after the first ``skip``."""
    per_epoch = math.ceil(len(examples) / batch_size)
    epoch, index = divmod(skip, per_epoch)
    while True:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(index * batch_size, len(examples), batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        epoch, index = epoch + 1, 0


def train(
    step: TrainStep,
    examples: list[Example],
    pad_id: int,
    args: TrainingArguments,
    state: TrainerState,
    log: TrainLog | None,
    save: Callable[[int], None],
    report: Callable[[str], None],
    evaluate: Callable[[], float] | None = None,
    memory: Callable[[], dict[str, int]] = dict,
    replicas: int = 1,
) -> dict[str, float]:
    """Run from ``state.global_step`` to ``state.max_steps``; returns the train metrics.

    ``log``: None on a torchrun rank that writes no outputs (it still takes part in every step,
    evaluation and save). ``evaluate`` (the eval loss) runs every ``eval_steps`` under
    ``eval_strategy steps`` and at the end of each epoch under ``eval_strategy epoch``; ``memory``
    gives the per-chip numbers of each log line; ``replicas``: data-parallel replicas, each taking
    per_device_train_batch_size rows of every batch.
    """
    accumulation = args.gradient_accumulation_steps
    batch_size = args.per_device_train_batch_size * replicas
    per_epoch = steps_per_epoch(len(examples), args, replicas)
    batches = batch_stream(examples, batch_size, args.seed, pad_id, skip=state.global_step * accumulation)
    first_step, started = state.global_step, time.time()
    losses_since_log: list[float] = []
    total_loss, tokens = 0.0, 0
    progress = _progress_bar(state.max_steps, first_step) if log is not None else None
    scaled = step.precision.scaler is not None
    step.set_training(True)
    while state.global_step < state.max_steps:
        step_batches = [next(batches) for _ in range(accumulation)]
        step_tokens = sum(int(b["attention_mask"].count_nonzero()) for b in step_batches)  # segment ids when packed
        step_loss, grad_norm = step(state.global_step + 1, step_batches, report)
        state.finish_step(per_epoch, step_tokens)
        tokens += step_tokens
        losses_since_log.append(step_loss)
        total_loss += step_loss
        elapsed = time.time() - started
        tokens_per_second = tokens / elapsed if elapsed > 0 else 0.0
        if progress is not None:
            progress.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_second:.0f}")
            progress.update(1)
        if state.global_step % args.logging_steps == 0 or state.global_step == state.max_steps:
            entry = {
                "loss": round(sum(losses_since_log) / len(losses_since_log), 4),
                "learning_rate": step.learning_rate(),
                "epoch": round(state.epoch, 4),
                "grad_norm": grad_norm,
                "step": state.global_step,
            }
            if scaled:
                entry["skipped_steps"] = step.precision.scaler.skipped_steps
            state.log_history.append(entry)
            if log is not None:
                record = log.write(
                    state.global_step,
                    entry["epoch"],
                    entry["loss"],
                    entry["learning_rate"],
                    tokens_per_second=round(tokens_per_second, 1),
                    **{k: v for k, v in entry.items() if k == "skipped_steps"},
                    **memory(),
                )
                if progress is None:
                    report(_plain_line(record))
            losses_since_log = []
        if evaluate is not None and evaluation_due(state.global_step, per_epoch, args):
            loss = evaluate()
            if log is not None:
                record_evaluation(state, log, loss, report)
        if save_due(state.global_step, state.max_steps, args.save_steps):
            save(state.global_step)
    if progress is not None:
        progress.close()
    return train_metrics(
        state.epoch,
        total_loss,
        state.global_step - first_step,
        time.time() - started,
        accumulation * batch_size,
        tokens,
    )


def save_due(step: int, max_steps: int, save_steps: int) -> bool:
    """Whether to save checkpoint-``step``: every ``save_steps`` and, as the HF Trainer does, at the
    last step (never with ``save_steps`` 0)."""
    return save_steps > 0 and (step % save_steps == 0 or step == max_steps)


def evaluation_due(step: int, per_epoch: int, args: TrainingArguments) -> bool:
    """Whether to evaluate after ``step``: every ``eval_steps`` (strategy steps) or at each epoch's end."""
    if args.eval_strategy == "steps":
        return step % (args.eval_steps or args.logging_steps) == 0
    return args.eval_strategy == "epoch" and step % per_epoch == 0


def _progress_bar(total: int, done: int):
    """A tqdm bar on a terminal; None otherwise (plain log lines are printed instead)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)


def _plain_line(record: dict) -> str:
    return (
        f"step {record['current_steps']}/{record['total_steps']}  loss {record['loss']:.4f}  "
        f"lr {record['learning_rate']:.3e}  epoch {record['epoch']:.2f}  "
        f"{record['tokens_per_second']:.0f} tok/s  elapsed {record['elapsed_time']}  "
        f"remaining {record['remaining_time']}"
    )
