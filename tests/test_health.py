"""Training health: a run whose loss stops being finite stops with one line instead of "succeeding",
no weights with inf/NaN are written, and data with nothing to train on is refused before loading."""

import pytest
import torch
from helpers import command, run
from safetensors.torch import load_file

from chipspan.chips import runner
from chipspan.cli import main
from chipspan.errors import ChipspanError
from chipspan.train.health import NONFINITE_STEP_LIMIT, NonFiniteGuard


def nan_from_call(monkeypatch, first_bad: int) -> None:
    """Make every training loss from the ``first_bad``-th micro-batch on (1-based) NaN."""
    real, calls = runner.pipelined_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) >= first_bad else value

    monkeypatch.setattr(runner, "pipelined_loss", loss)


def test_nonfinite_steps_are_not_applied_and_three_in_a_row_stop_the_run(tiny_workspace, tmp_path, monkeypatch):
    out = tmp_path / "out"
    nan_from_call(monkeypatch, first_bad=3)  # steps 1-2 train, 3-5 are NaN
    lines = []
    with pytest.raises(ChipspanError, match=r"training diverged: steps 3-5 all had a non-finite loss nan"):
        run(command(tiny_workspace, out, "lora"), report=lines.append)
    assert sum("is not applied" in line for line in lines) == NONFINITE_STEP_LIMIT - 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    before, during = (load_file(out / f"checkpoint-{n}" / "adapter_model.safetensors") for n in (2, 4))
    assert all(torch.isfinite(t).all() for t in before.values())
    assert all(torch.equal(before[name], during[name]) for name in before)  # steps 3-4 changed nothing
    assert not (out / "adapter_model.safetensors").exists()  # the run did not end as if it had trained


def test_one_nonfinite_step_is_skipped_and_training_goes_on(tiny_workspace, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = runner.pipelined_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) == 2 else value

    monkeypatch.setattr(runner, "pipelined_loss", loss)
    run(command(tiny_workspace, out, "lora"))
    adapter = load_file(out / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)  # steps 1, 3-6 trained


def test_weights_holding_nan_are_never_written(tiny_workspace, tmp_path, monkeypatch):
    out = tmp_path / "out"
    nan_from_call(monkeypatch, first_bad=1)
    monkeypatch.setattr(NonFiniteGuard, "allows", lambda *args: True)  # the NaN gradients reach AdamW
    with pytest.raises(
        ChipspanError,
        match=r"the trained weight \S+lora_\S+ holds inf/NaN, so checkpoint-2 "
        "was not written",
    ):
        run(command(tiny_workspace, out, "lora"))
    assert not list(out.glob("checkpoint-*")) and not (out / "adapter_model.safetensors").exists()


def test_data_with_no_token_to_train_is_refused_before_loading(tiny_workspace, tmp_path, capsys):
    argv = command(tiny_workspace, tmp_path / "out", "lora")
    argv[argv.index("--cutoff_len") + 1] = "1"  # room for one prompt token, no answer
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no usable rows: all 40 were dropped: 40 has no tokens to train on" in err[0]
    assert "--cutoff_len 1 may leave no room for the answers" in err[0]
    assert not (tmp_path / "out").exists()


def test_the_guard_leaves_fp16_overflows_to_the_loss_scaler():
    guard, said = NonFiniteGuard(5e-5, scaled=True), []
    assert guard.allows(1, 2.5, float("inf"), said.append)  # an overflow: the scaler skips it
    assert guard.allows(2, float("nan"), float("nan"), said.append) and guard.skipped_steps == 0
    assert guard.allows(3, 2.4, 1.0, said.append) and guard.in_a_row == 0
    unscaled = NonFiniteGuard(5e-5, scaled=False)
    assert not unscaled.allows(1, 2.5, float("inf"), said.append) and unscaled.skipped_steps == 1
