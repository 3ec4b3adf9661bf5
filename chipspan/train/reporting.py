"""What a run leaves in ``output_dir`` about itself, in LLaMA-Factory 0.5's formats.

- ``trainer_log.jsonl``: one JSON object per log (LLaMA-Factory's LogCallback fields).
- ``trainer_state.json``: the Hugging Face Trainer's state, ``log_history`` included.
- ``train_results.json`` / ``all_results.json``: the final metrics.
- ``training_loss.png``: raw and EMA-smoothed loss, with ``--plot_loss``.
- ``generated_predictions.jsonl``: the answers of ``--do_predict``.
- with ``--report_to``, every number of every log line, as ``train/<key>`` or ``eval/<key>`` by global step,
  to each tracker it names: TensorBoard event files under ``logging_dir`` (default ``output_dir/runs``);
  a wandb run under ``output_dir/wandb``, an MLflow run (``output_dir/mlruns`` unless
  ``MLFLOW_TRACKING_URI`` names a server) and a SwanLab run under ``output_dir/swanlog``, each named
  ``--run_name`` (default: ``output_dir``) with every flag as its config. Their own environment
  variables (``WANDB_MODE``, ``WANDB_PROJECT``, ``SWANLAB_MODE``, ...) decide online or offline.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from chipspan.errors import ChipspanError

if TYPE_CHECKING:
    from chipspan.args import RunArguments

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


# --report_to's trackers; each is also the name of the package it needs.
TRACKERS = ("tensorboard", "wandb", "mlflow", "swanlab")


def trackers_wanted(report_to: str) -> list[str]:
    """The trackers ``--report_to`` names (a comma list of them, ``none``, or ``all``: every one that is
    installed, as the Hugging Face Trainer reads it); refuses those whose package is not installed."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if names == ["all"]:
        return [name for name in TRACKERS if _installed(name)]
    if "none" in names:
        if len(names) > 1:
            raise ChipspanError(f"--report_to {report_to}: none stands alone (drop it, or pass --report_to none)")
        return []
    missing = [name for name in names if not _installed(name)]
    if missing:
        packages = " and ".join(missing)
        extras = ",".join(missing)
        raise ChipspanError(
            f"--report_to {report_to} needs the {packages} package{'s' * (len(missing) > 1)}: "
            f"pip install {' '.join(missing)} (or pip install 'chipspan[{extras}]'; or pass --report_to none)"
        )
    return list(dict.fromkeys(names))


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


class Tracker(Protocol):
    """Where the numbers of the log lines go besides trainer_log.jsonl."""

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files in ``folder``."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run whose files are under ``output_dir/wandb``; the project is ``WANDB_PROJECT`` (default
    chipspan), online or offline as ``WANDB_MODE`` says."""

    def __init__(self, output_dir: Path, name: str, config: dict[str, Any]):
        import wandb

        project = os.environ.get("WANDB_PROJECT", "chipspan")
        self.run = wandb.init(dir=str(output_dir), project=project, name=name, config=config)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run in ``MLFLOW_TRACKING_URI``, else in the file store ``output_dir/mlruns``; the
    experiment is ``MLFLOW_EXPERIMENT_NAME`` (MLflow's default when unset)."""

    def __init__(self, output_dir: Path, name: str, config: dict[str, Any]):
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
        self.mlflow = mlflow
        mlflow.start_run(run_name=name)
        mlflow.log_params(config)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class SwanlabTracker:
    """A SwanLab experiment logged under ``output_dir/swanlog``, online or not as ``SWANLAB_MODE`` says."""

    def __init__(self, output_dir: Path, name: str, config: dict[str, Any]):
        import swanlab

        folder = output_dir / "swanlog"
        folder.mkdir(exist_ok=True)
        self.swanlab = swanlab
        swanlab.init(experiment_name=name, config=config, logdir=str(folder))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.swanlab.log(scalars, step=step)

    def close(self) -> None:
        self.swanlab.finish()


def open_trackers(run: RunArguments) -> list[Tracker]:
    """A started tracker for each one ``--report_to`` names; a ChipspanError naming the tracker when
    one cannot start (a wandb run online with no login, say), with those started before closed."""
    train_args = run.training
    output_dir = Path(train_args.output_dir)
    name, config = train_args.run_name or train_args.output_dir, run_config(run)
    starts = {
        "tensorboard": lambda: TensorBoardTracker(Path(train_args.logging_dir or output_dir / "runs")),
        "wandb": lambda: WandbTracker(output_dir, name, config),
        "mlflow": lambda: MlflowTracker(output_dir, name, config),
        "swanlab": lambda: SwanlabTracker(output_dir, name, config),
    }
    trackers: list[Tracker] = []
    for tracker in trackers_wanted(train_args.report_to):
        try:
            trackers.append(starts[tracker]())
        except Exception as exc:  # any failure of the tracker's own library: its first line says why
            for started in trackers:
                started.close()
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ChipspanError(f"--report_to {tracker}: {tracker} could not start a run: {reason}") from exc
    return trackers


def run_config(run: RunArguments) -> dict[str, Any]:
    """Every flag of ``run`` and its value (flags are unique across the groups): the trackers' run config."""
    return {
        name: value
        for group in dataclasses.fields(run)
        if dataclasses.is_dataclass(getattr(run, group.name))
        for name, value in asdict(getattr(run, group.name)).items()
    }


class TrainLog:
    """Appends LLaMA-Factory 0.5's ``trainer_log.jsonl`` lines and keeps time for elapsed/remaining.

    The numbers of every line also go to each of ``trackers`` (see :func:`open_trackers`).
    """

    def __init__(self, output_dir: Path, total_steps: int, start_step: int = 0, trackers: Sequence[Tracker] = ()):
        self.file = output_dir / LOG_FILE
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.time()
        self.trackers = list(trackers)

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
        if self.trackers:
            numbers = scalars(record)
            for tracker in self.trackers:
                tracker.log(step, numbers)
        return record

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The measurements of one log line, named as the Hugging Face Trainer names them for its trackers:
    ``train/<key>``, ``eval/<key>`` for ``eval_<key>``."""
    return {
        f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}": value
        for key, value in record.items()
        if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


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
