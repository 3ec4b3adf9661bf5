"""The training loop: micro-batches -> loss -> backward over the chips -> clip -> AdamW -> log/save.

Every optimizer step consumes ``gradient_accumulation_steps`` micro-batches from one stream that
runs across epochs; each epoch visits the examples in an order drawn from ``seed + epoch``. So step
N always sees the same batches, which is what makes a resumed run continue exactly.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from chipspan.args import TrainingArguments
from chipspan.chips.pipeline import pipelined_loss
from chipspan.chips.span import SpannedModel
from chipspan.data import Example, collate
from chipspan.train.health import NonFiniteGuard
from chipspan.train.reporting import TrainerState, TrainLog, record_evaluation, train_metrics


@dataclass
class Precision:
    """How arithmetic runs: autocast to ``autocast_dtype`` on ``device_type`` (None: plain), and a
    dynamic loss scaler for fp16, which skips the steps whose gradients overflow (``skipped_steps``)."""

    device_type: str
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    skipped_steps: int = 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true size (before clipping)."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the gradients; False when the scaler found inf/NaN in them and skipped the step."""
        if not self.scaler:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= scale  # the scale only drops after an overflow
        self.skipped_steps += not stepped
        return stepped

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler else None, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, saved: dict) -> None:
        if self.scaler and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.skipped_steps = saved.get("skipped_steps", 0)


def steps_per_epoch(num_examples: int, args: TrainingArguments) -> int:
    """Optimizer steps in one pass over the data (at least 1)."""
    micro = math.ceil(num_examples / args.per_device_train_batch_size)
    return max(micro // args.gradient_accumulation_steps, 1)


def total_steps(num_examples: int, args: TrainingArguments) -> int:
    if args.max_steps > 0:
        return args.max_steps
    return math.ceil(args.num_train_epochs * steps_per_epoch(num_examples, args))


def micro_batches(
    examples: list[Example], batch_size: int, seed: int, pad_id: int, skip: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless padded micro-batches, epoch after epoch, starting after the first ``skip``."""
    per_epoch = math.ceil(len(examples) / batch_size)
    epoch, index = divmod(skip, per_epoch)
    while True:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(index * batch_size, len(examples), batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        epoch, index = epoch + 1, 0


def train(
    model: SpannedModel,
    examples: list[Example],
    pad_id: int,
    args: TrainingArguments,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    precision: Precision,
    state: TrainerState,
    log: TrainLog,
    save: Callable[[int], None],
    report: Callable[[str], None],
    evaluate: Callable[[], float] | None = None,
    memory: Callable[[], dict[str, int]] = dict,
) -> dict[str, float]:
    """Run from ``state.global_step`` to ``state.max_steps``; returns the train metrics.

    ``evaluate`` (the eval loss) runs every ``eval_steps`` under ``eval_strategy steps`` and at the end
    of each epoch under ``eval_strategy epoch``; ``memory`` gives the per-chip numbers of each log line.
    A step the fp16 loss scaler skips (gradients overflowed) leaves the weights and the learning
    rate as they were; the log counts such steps in ``skipped_steps``. So does a step whose loss or
    gradient norm is inf/NaN (:class:`NonFiniteGuard`, which stops a run that keeps producing them).
    """
    accumulation = args.gradient_accumulation_steps
    per_epoch = steps_per_epoch(len(examples), args)
    batches = micro_batches(
        examples, args.per_device_train_batch_size, args.seed, pad_id, skip=state.global_step * accumulation
    )
    first_step, started = state.global_step, time.time()
    losses_since_log: list[float] = []
    total_loss, tokens = 0.0, 0
    progress = _progress_bar(state.max_steps, first_step)
    guard = NonFiniteGuard(args.learning_rate, scaled=precision.scaler is not None)
    model.train()
    while state.global_step < state.max_steps:
        step_loss, step_tokens = 0.0, 0
        for _ in range(accumulation):
            batch = next(batches)
            with precision.autocast():
                loss = pipelined_loss(model, batch, args.micro_batches) / accumulation
            precision.backward(loss)
            step_loss += loss.item()
            step_tokens += int(batch["attention_mask"].count_nonzero())  # segment ids when packed
        precision.unscale(optimizer)
        grad_norm = float(model.clip_gradients(args.max_grad_norm))
        if guard.allows(state.global_step + 1, step_loss, grad_norm, report) and precision.step(optimizer):
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
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
                "learning_rate": scheduler.get_last_lr()[0],
                "epoch": round(state.epoch, 4),
                "grad_norm": grad_norm,
                "step": state.global_step,
            }
            if precision.scaler:
                entry["skipped_steps"] = precision.skipped_steps
            state.log_history.append(entry)
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
            record_evaluation(state, log, evaluate(), report)
        if args.save_steps > 0 and state.global_step % args.save_steps == 0 and state.global_step < state.max_steps:
            save(state.global_step)
    if progress is not None:
        progress.close()
    return train_metrics(
        state.epoch,
        total_loss,
        state.global_step - first_step,
        time.time() - started,
        accumulation * args.per_device_train_batch_size,
        tokens,
    )


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
