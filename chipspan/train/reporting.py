"""What a run leaves in ``output_dir`` about itself, in LLaMA-Factory 0.5's formats.

- ``trainer_log.jsonl``: one JSON object per log (LLaMA-Factory's LogCallback fields).
- ``trainer_state.json``: the Hugging Face Trainer's state, ``log_history`` included.
- ``train_results.json`` / ``all_results.json``: the final metrics.
- ``training_loss.png``: raw and EMA-smoothed loss, with ``--plot_loss``.
- ``generated_predictions.jsonl``: the answers of ``--do_predict``.
- TensorBoard event files under ``logging_dir`` (default ``output_dir/runs``), with
  ``--report_to tensorboard``: every number of every log line, as ``train/<key>`` or ``eval/<key>``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from chipspan.errors import ChipspanError

LOG_FILE = "trainer_log.jsonl"
STATE_FILE = "trainer_state.json"
PREDICTIONS_FILE = "generated_predictions.jsonl"


@dataclass
class TrainerState:
    """The Hugging Face Trainer's ``trainer_state.json``."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    num_train_epochs: float = 0.0
    logging_steps: int = 500
    save_steps: int = 500
    train_batch_size: int = 1
    num_input_tokens_seen: int = 0
    total_flos: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_model_checkpoint: str | None = None
    is_hyper_param_search: bool = False
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    trial_name: str | None = None
    trial_params: dict | None = None

    def finish_step(self, steps_per_epoch: int, tokens: int) -> None:
        """Count one optimizer step that consumed ``tokens`` input tokens."""
        self.global_step += 1
        self.epoch = self.global_step / steps_per_epoch
        self.num_input_tokens_seen += tokens

    def save(self, folder: Path) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: Path) -> TrainerState:
        """The state saved in ``folder``; a ChipspanError when the file is not a trainer state."""
        file = folder / STATE_FILE
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ChipspanError(f"cannot read {file}: {exc}") from None
        if not (
            isinstance(data, dict)
            and isinstance(data.get("global_step"), int)
            and data["global_step"] >= 0
            and isinstance(data.get("log_history", []), list)
        ):
            raise ChipspanError(f"{file} is not a trainer state (no non-negative global_step or no log_history list)")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def tensorboard_wanted(report_to: str) -> bool:
    """Whether ``--report_to`` asks for TensorBoard; refuses it when tensorboard is not installed.

    ``all`` means TensorBoard when it is installed, as the Hugging Face Trainer reads it.
    """
    installed = importlib.util.find_spec("tensorboard") is not None
    if report_to == "tensorboard" and not installed:
        raise ChipspanError(
            "--report_to tensorboard needs the tensorboard package: pip install tensorboard (or pass --report_to none)"
        )
    return report_to != "none" and installed


class TrainLog:
    """Appends LLaMA-Factory 0.5's ``trainer_log.jsonl`` lines and keeps time for elapsed/remaining.

    With ``tensorboard_dir``, the numbers of every line also go to TensorBoard event files there.
    """

    def __init__(self, output_dir: Path, total_steps: int, start_step: int = 0, tensorboard_dir: Path | None = None):
        self.file = output_dir / LOG_FILE
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.time()
        self.tensorboard = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(tensorboard_dir))

    def timing(self, step: int) -> tuple[str, str]:
        """(elapsed, remaining) as H:MM:SS, from the pace of the steps run in this process."""
        elapsed = time.time() - self.start_time
        done = step - self.start_step
        per_step = elapsed / done if done > 0 else 0.0
        return (str(timedelta(seconds=int(elapsed))), str(timedelta(seconds=int((self.total_steps - step) * per_step))))

    def write(
        self,
        step: int,
        epoch: float,
        loss: float | None = None,
        learning_rate: float | None = None,
        eval_loss: float | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        elapsed, remaining = self.timing(step)
        record = {
            "current_steps": step,
            "total_steps": self.total_steps,
            "loss": loss,
            "eval_loss": eval_loss,
            "predict_loss": None,
            "reward": None,
            "learning_rate": learning_rate,
            "epoch": epoch,
            "percentage": round(step / self.total_steps * 100, 2) if self.total_steps else 100,
            "elapsed_time": elapsed,
            "remaining_time": remaining,
            **extra,
        }
        with self.file.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self._to_tensorboard(step, record)
        return record

    def _to_tensorboard(self, step: int, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key in _NOT_SCALARS or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
            self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


# Log fields that are bookkeeping, not measurements.
_NOT_SCALARS = {"current_steps", "total_steps", "percentage"}


def truncate_log(file: Path, last_step: int) -> None:
    """Keep only the log lines up to ``last_step`` (a resumed run rewrites what came after). A line that
    is not a JSON object — the torn last line of a killed run — goes too."""
    if not file.exists():
        return
    kept = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        step = _logged_step(line)
        if step is not None and step <= last_step:
            kept.append(line)
    file.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _logged_step(line: str) -> int | None:
    """The step of one log line; None for a line that is not a log record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("current_steps", 0) if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def train_metrics(
    epoch: float, total_loss: float, steps: int, runtime: float, examples_per_step: int, tokens: int
) -> dict[str, float]:
    """The HF Trainer's ``train_results.json`` numbers for ``steps`` steps run in ``runtime`` seconds."""

    def per_second(amount: float, digits: int) -> float:
        return round(amount / runtime, digits) if runtime else 0.0

    return {
        "epoch": round(epoch, 4),
        "train_loss": total_loss / steps if steps else 0.0,
        "train_runtime": round(runtime, 4),
        "train_samples_per_second": per_second(steps * examples_per_step, 3),
        "train_steps_per_second": per_second(steps, 3),
        "train_tokens_per_second": per_second(tokens, 1),
    }


def write_results(output_dir: Path, metrics: dict[str, Any], split: str = "train") -> None:
    """``{split}_results.json``, merged into ``all_results.json``, as the HF Trainer writes them."""
    (output_dir / f"{split}_results.json").write_text(json.dumps(metrics, indent=4, sort_keys=True) + "\n")
    all_file = output_dir / "all_results.json"
    merged = json.loads(all_file.read_text()) if all_file.is_file() else {}
    merged.update(metrics)
    all_file.write_text(json.dumps(merged, indent=4, sort_keys=True) + "\n")


def smooth(values: list[float]) -> list[float]:
    """TensorBoard-style EMA whose weight grows with the number of points (LLaMA-Factory 0.5's smoothing)."""
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    smoothed, last = [], values[0]
    for value in values:
        last = last * weight + (1 - weight) * value
        smoothed.append(last)
    return smoothed


def plot_metric(output_dir: Path, log_history: list[dict[str, Any]], key: str = "loss") -> Path | None:
    """``training_{key}.png``: raw and smoothed curve over steps; None when nothing was logged."""
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*points)
    figure = plt.figure()
    plt.plot(steps, values, alpha=0.4, label="original")
    plt.plot(steps, smooth(list(values)), label="smoothed")
    plt.title(f"training {key} of {output_dir}")
    plt.xlabel("step")
    plt.ylabel(key)
    plt.legend()
    path = output_dir / f"training_{key}.png"
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
    return path


def record_evaluation(state: TrainerState, log: TrainLog, eval_loss: float, report: Callable[[str], None]) -> None:
    """An eval loss taken after ``state.global_step``: into the trainer state's history, the log file
    and the report."""
    epoch = round(state.epoch, 4)
    state.log_history.append({"eval_loss": eval_loss, "epoch": epoch, "step": state.global_step})
    log.write(state.global_step, epoch, eval_loss=eval_loss)
    report(f"step {state.global_step}: eval_loss {eval_loss:.4f}")
