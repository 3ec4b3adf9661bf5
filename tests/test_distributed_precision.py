"""Precision with one process per chip: the ranks agree on every fp16 overflow, and --bf16/--fp16
autocast exactly as one process does.

On the CPU --fp16/--bf16 are ignored (fp32), so these runs make the CPU honour them: the loss-scaling
test swaps in a precision with a loss scaler and fp32 arithmetic (the scale still applied and
removed: powers of two, exact), the autocast test lets the CPU autocast as an accelerator does.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import log_lines, losses, needs_few_micro_batches, one_process, torchrun, train_flags  # noqa: E402

# torchrun worker: argv = OUT POISON_STEP MODE chipspan-arguments...; MODE "scaler": fp32 arithmetic
# with a loss scaler, rank 0's gradients poisoned in step POISON_STEP (0: never), each rank's
# (overflowed, scale) recorded after every update; MODE "autocast": the CPU autocasts. Both record
# each rank's step losses, unrounded.
WORKER = """
import json, os, sys
from pathlib import Path
import torch
from chipspan import precision
from chipspan.cli import main
from chipspan.distributed import recipe
from chipspan.distributed.runner import RankRunner
from chipspan.train.step import TrainStep

torch.set_num_threads(1)
out, poison_step, mode, rank = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(os.environ["RANK"])
if mode == "scaler":
    recipe.choose_precision = lambda run, device_type: precision.PrecisionChoice(
        device_type, None, True, torch.float32, torch.float32)
else:
    precision.FP32_ONLY_DEVICE_TYPES = ()

forward_backward, calls = RankRunner.forward_backward, [0]
def poisoning(self, *args, **kwargs):
    loss = forward_backward(self, *args, **kwargs)
    calls[0] += 1
    if rank == 0 and calls[0] == poison_step:
        next(p.grad for p in self.trained if p.grad is not None).view(-1)[0] = float("inf")
    return loss
RankRunner.forward_backward = poisoning

update = precision.LossScaler.update
def recording_update(self, overflowed):
    update(self, overflowed)
    with open(out / f"scales-rank{rank}.jsonl", "a") as f:
        f.write(json.dumps([overflowed, self.scale]) + "\\n")
precision.LossScaler.update = recording_update

step = TrainStep.__call__
def recording_step(self, *args, **kwargs):
    loss, norm = step(self, *args, **kwargs)
    with open(out / f"losses-rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(loss) + "\\n")
    with open(out / f"norms-rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(norm) + "\\n")
    return loss, norm
TrainStep.__call__ = recording_step
sys.exit(main(sys.argv[4:]))
"""


def scales(folder, rank):
    return [tuple(json.loads(line)) for line in (folder / f"scales-rank{rank}.jsonl").read_text().splitlines()]


def step_losses(folder, rank=0):
    return [json.loads(line) for line in (folder / f"losses-rank{rank}.jsonl").read_text().splitlines()]


def step_norms(folder, rank=0):
    """Each step's gradient norm before clipping: far more sensitive to 16-bit arithmetic than the loss."""
    return [json.loads(line) for line in (folder / f"norms-rank{rank}.jsonl").read_text().splitlines()]


def record_single_process_steps(monkeypatch, folder):
    """Record each step loss of a one-process run into ``folder``, as the worker does."""
    from chipspan.train.step import TrainStep

    step = TrainStep.__call__

    def recording_step(self, *args, **kwargs):
        loss, norm = step(self, *args, **kwargs)
        with open(folder / "losses-rank0.jsonl", "a") as f:
            f.write(json.dumps(loss) + "\n")
        with open(folder / "norms-rank0.jsonl", "a") as f:
            f.write(json.dumps(norm) + "\n")
        return loss, norm

    monkeypatch.setattr(TrainStep, "__call__", recording_step)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(tiny_workspace, tmp_path, monkeypatch):
    from chipspan import precision
    from chipspan.chips.runner import ChipsRunner
    from chipspan.train import recipe

    # one process: the same scaler, step 2's gradients overflow
    monkeypatch.setattr(
        recipe,
        "choose_precision",
        lambda run, device_type: precision.PrecisionChoice(device_type, None, True, torch.float32, torch.float32),
    )
    forward_backward, calls = ChipsRunner.forward_backward, [0]

    def poisoning(self, *args, **kwargs):
        loss = forward_backward(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 2:
            next(p.grad for p in self.trained if p.grad is not None).view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(ChipsRunner, "forward_backward", poisoning)
    single = tmp_path / "single"
    one_process(train_flags(tiny_workspace, single, "--overwrite_output_dir"))

    script, records = tmp_path / "worker.py", tmp_path / "records"
    script.write_text(WORKER)
    records.mkdir()
    staged = tmp_path / "staged"
    flags = train_flags(tiny_workspace, staged, "--overwrite_output_dir", "--micro_batches", "2")
    torchrun(script, records, 2, "scaler", "train", *flags)

    expected = [(False, 2.0**16), (True, 2.0**15), (False, 2.0**15), (False, 2.0**15)]
    assert scales(records, 0) == scales(records, 1) == expected  # rank 1's gradients were finite
    ours, theirs = log_lines(staged), log_lines(single)
    assert [line["skipped_steps"] for line in ours] == [line["skipped_steps"] for line in theirs] == [0, 1, 1, 1]
    assert [line["learning_rate"] for line in ours] == [line["learning_rate"] for line in theirs]
    assert [line["loss"] for line in ours] == [line["loss"] for line in theirs]
    saved = torch.load(staged / "checkpoint-2" / "scaler.pt", weights_only=True)
    assert saved == torch.load(single / "checkpoint-2" / "scaler.pt", weights_only=True)
    assert saved["scaler"]["scale"] == 2.0**15 and saved["skipped_steps"] == 1

    # resuming from checkpoint-2 restores the halved scale and the count on both ranks
    (tmp_path / "resumed").mkdir()
    resume = train_flags(tiny_workspace, staged, "--resume_from_checkpoint", staged / "checkpoint-2")
    torchrun(script, tmp_path / "resumed", 0, "scaler", "train", *resume)
    assert scales(tmp_path / "resumed", 0) == scales(tmp_path / "resumed", 1) == expected[2:]
    assert [line["loss"] for line in log_lines(staged)] == [line["loss"] for line in theirs]
    assert [line["skipped_steps"] for line in log_lines(staged)] == [0, 1, 1, 1]  # steps 1-2 kept from before


@pytest.mark.slow
@pytest.mark.multiprocess
@needs_few_micro_batches  # --micro_batches 1 over two stages
@pytest.mark.parametrize("flag", ["--bf16", "--fp16"])
@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_half_precision_autocasts_under_torchrun_as_in_one_process(
    tiny_workspace, tmp_path, monkeypatch, flag, finetuning
):
    """10 steps of --bf16/--fp16 with the CPU autocasting: the step losses of 2 stages under torchrun
    are the single process's within 1e-5, and so are their gradient norms, which differ from fp32's (autocast is really on in both)."""
    from chipspan import precision

    lora = ["--lora_target", "q_proj,v_proj", "--learning_rate", "1e-2"] if finetuning == "lora" else []
    extra = ["--overwrite_output_dir", "--finetuning_type", finetuning, *lora, "--max_steps", "10",
             "--save_steps", "0", "--gradient_accumulation_steps", "1"]  # fmt: skip
    fp32, single, staged = (tmp_path / name for name in ("fp32", "single", "staged"))
    for folder in (fp32, single, staged):
        folder.mkdir()
    with monkeypatch.context() as patched:
        record_single_process_steps(patched, fp32)
        one_process(train_flags(tiny_workspace, fp32 / "out", *extra))
    monkeypatch.setattr(precision, "FP32_ONLY_DEVICE_TYPES", ())
    record_single_process_steps(monkeypatch, single)
    one_process(train_flags(tiny_workspace, single / "out", *extra, flag))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    staged_flags = train_flags(tiny_workspace, staged / "out", *extra, flag, "--pipeline_schedule", "gpipe")
    torchrun(script, staged, 0, "autocast", "train", *staged_flags, "--micro_batches", "1")

    ours, theirs = step_losses(staged), step_losses(single)
    assert len(ours) == len(theirs) == 10
    assert ours == pytest.approx(theirs, rel=1e-5)
    norms, their_norms, plain_norms = step_norms(staged), step_norms(single), step_norms(fp32)
    assert norms == pytest.approx(their_norms, rel=1e-5)
    # 16-bit arithmetic shows in the gradients (1e-4 to 1e-2 relative against parity near 1e-7), so a
    # path without autocast fails the parity above, and both without it fail here
    assert max(abs(a - b) / b for a, b in zip(norms, plain_norms)) > 1e-4


@pytest.mark.slow
@pytest.mark.multiprocess
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
