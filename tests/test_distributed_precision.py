"""fp16 dynamic loss scaling with one process per chip: the ranks agree on every overflow.

On the CPU ``--fp16`` is ignored, so both runs here get a loss scaler by patching
``recipe.choose_precision`` (fp32 arithmetic, the scale still applied and removed: powers of two,
exact). One gradient of rank 0 alone is set to inf in step 2; rank 1's gradients are finite, yet
both ranks must skip that step and halve their scale, and every logged loss must equal a
single-process run whose step 2 overflows the same way.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import losses, one_process, torchrun, train_flags  # noqa: E402

SCALER = "(Precision(device_type, None, torch.amp.GradScaler(device_type)), torch.float32)"

# torchrun worker: argv = OUT POISON_STEP chipspan-arguments...; poisons rank 0's gradients in step
# POISON_STEP (0: never) and records each rank's (overflowed, scale) after every update.
WORKER = f"""
import json, os, sys
from pathlib import Path
import pytest
import torch
from chipspan.cli import main
from chipspan.distributed import pipeline, scaling
from chipspan.train import recipe
from chipspan.train.loop import Precision

torch.set_num_threads(1)
out, poison_step, rank = Path(sys.argv[1]), int(sys.argv[2]), int(os.environ["RANK"])
recipe.choose_precision = lambda run, device_type, report: {SCALER}

step, calls = pipeline.PipelineRunner.step, [0]
def poisoning_step(self, *args, **kwargs):
    loss = step(self, *args, **kwargs)
    calls[0] += 1
    if rank == 0 and calls[0] == poison_step:
        next(p.grad for m in self.modules for p in m.parameters() if p.grad is not None).view(-1)[0] = float("inf")
    return loss
pipeline.PipelineRunner.step = poisoning_step

update = scaling.LossScaler.update
def recording_update(self, overflowed):
    update(self, overflowed)
    with open(out / f"scales-rank{{rank}}.jsonl", "a") as f:
        f.write(json.dumps([overflowed, self.scale]) + "\\n")
scaling.LossScaler.update = recording_update
sys.exit(main(sys.argv[3:]))
"""


def log_lines(out):
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def scales(folder, rank):
    return [tuple(json.loads(line)) for line in (folder / f"scales-rank{rank}.jsonl").read_text().splitlines()]


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(tiny_workspace, tmp_path, monkeypatch):
    from chipspan.train import recipe
    from chipspan.train.loop import Precision

    # one process: the same scaler, step 2's gradients overflow
    monkeypatch.setattr(
        recipe,
        "choose_precision",
        lambda run, device_type, report: (
            Precision(device_type, None, torch.amp.GradScaler(device_type)),
            torch.float32,
        ),
    )
    unscale, calls = Precision.unscale, [0]

    def poisoning_unscale(self, optimizer):
        calls[0] += 1
        if calls[0] == 2:
            optimizer.param_groups[0]["params"][0].grad.view(-1)[0] = float("inf")
        unscale(self, optimizer)

    monkeypatch.setattr(Precision, "unscale", poisoning_unscale)
    single = tmp_path / "single"
    one_process(train_flags(tiny_workspace, single, "--overwrite_output_dir"))

    script, records = tmp_path / "worker.py", tmp_path / "records"
    script.write_text(WORKER)
    records.mkdir()
    staged = tmp_path / "staged"
    torchrun(
        script,
        records,
        2,
        "train",
        *train_flags(tiny_workspace, staged, "--overwrite_output_dir", "--micro_batches", "2"),
    )

    expected = [(False, 2.0**16), (True, 2.0**15), (False, 2.0**15), (False, 2.0**15)]
    assert scales(records, 0) == scales(records, 1) == expected  # rank 1's gradients were finite
    ours, theirs = log_lines(staged), log_lines(single)
    assert [line["skipped_steps"] for line in ours] == [line["skipped_steps"] for line in theirs] == [0, 1, 1, 1]
    assert [line["learning_rate"] for line in ours] == [line["learning_rate"] for line in theirs]
    assert losses(staged) == losses(single)
    saved = torch.load(staged / "checkpoint-2" / "scaler.pt", weights_only=False)
    assert saved == torch.load(single / "checkpoint-2" / "scaler.pt", weights_only=False)
    assert saved["scaler"]["scale"] == 2.0**15 and saved["skipped_steps"] == 1

    # resuming from checkpoint-2 restores the halved scale and the count on both ranks
    (tmp_path / "resumed").mkdir()
    torchrun(script, tmp_path / "resumed", 0, "train", *train_flags(tiny_workspace, staged))
    assert scales(tmp_path / "resumed", 0) == scales(tmp_path / "resumed", 1) == expected[2:]
    assert losses(staged) == losses(single)
    assert [line["skipped_steps"] for line in log_lines(staged)] == [0, 1, 1, 1]  # steps 1-2 kept from before


def test_eval_loss_through_the_pipeline_is_the_single_process_one(tiny_workspace, tmp_path):
    """--val_size, --eval_strategy steps and --do_eval under torchrun: the forward-only pipeline gives
    the single process's eval_loss (each batch's token mean counted once per example); 2 data-parallel
    replicas split the eval batches. The 2-stage run also reports to TensorBoard (rank 0)."""
    extra = [
        "--overwrite_output_dir",
        "--val_size",
        "7",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--do_eval",
        "--per_device_eval_batch_size",
        "3",
        "--max_steps",
        "2",
        "--save_steps",
        "0",
    ]
    single = tmp_path / "single"
    one_process(train_flags(tiny_workspace, single, *extra))
    expected = [line["eval_loss"] for line in log_lines(single) if line.get("eval_loss") is not None]
    final = json.loads((single / "eval_results.json").read_text())["eval_loss"]
    assert len(expected) == 1
    tensorboard = ["--report_to", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    for name, layout in (
        ("staged", ["--pipeline_schedule", "gpipe", *tensorboard]),
        ("replicas", ["--data_parallel", "2", "--per_device_train_batch_size", "2"]),
    ):
        out = tmp_path / name
        torchrun("-m", "chipspan", "train", *train_flags(tiny_workspace, out, *extra, *layout))
        ours = [line["eval_loss"] for line in log_lines(out) if line.get("eval_loss") is not None]
        assert ours == pytest.approx(expected, rel=1e-5), name
        assert json.loads((out / "eval_results.json").read_text())["eval_loss"] == pytest.approx(final, rel=1e-5)
        assert losses(out) == losses(single), name
    if tensorboard:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "staged" / "runs")).Reload()
        assert [round(e.value, 4) for e in events.Scalars("train/loss")] == [x for x in losses(single) if x is not None]
        assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx(expected, rel=1e-5)
