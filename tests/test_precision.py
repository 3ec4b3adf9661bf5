"""fp16 loss scaling on the emulated chips (an overflow is skipped, counted and survived), pure bf16,
and per-chip memory in every log line."""

import pytest
import torch
from helpers import command, log_lines, run
from safetensors.torch import load_file

from chipspan import emu
from chipspan.chips import runner

pytestmark = pytest.mark.skipif(not emu.is_available(), reason="the emulated chips cannot be built here")


def emu_command(tiny_workspace, out, *extra):
    argv = command(tiny_workspace, out, "lora")
    argv[argv.index("--device") + 1] = "emu"
    return argv + ["--lr_scheduler_type", "linear", "--save_steps", "3", *extra]


@pytest.mark.slow
def test_an_fp16_overflow_skips_the_step_lowers_the_scale_and_training_goes_on(tiny_workspace, tmp_path, monkeypatch):
    forward, calls = runner.pipelined_loss, [0]

    def overflowing_forward(*args, **kwargs):
        calls[0] += 1
        loss = forward(*args, **kwargs)
        return loss * float("inf") if calls[0] == 2 else loss  # step 2's gradients overflow

    monkeypatch.setattr(runner, "pipelined_loss", overflowing_forward)
    out = tmp_path / "fp16"
    run(emu_command(tiny_workspace, out, "--fp16"))

    lines = log_lines(out)
    assert [line["skipped_steps"] for line in lines] == [0, 1, 1, 1, 1, 1]
    rates = [line["learning_rate"] for line in lines]
    assert rates[1] == rates[0] and rates[2] < rates[1]  # the skipped step did not advance the schedule
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines[2:])
    scaler = torch.load(out / "checkpoint-3" / "scaler.pt", weights_only=False)
    assert scaler["scaler"]["scale"] == 2.0**15 and scaler["skipped_steps"] == 1  # halved once from 2**16
    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter_model.safetensors").values())


def test_log_lines_carry_each_chips_memory(tiny_workspace, tmp_path):
    out = tmp_path / "memory"
    run(emu_command(tiny_workspace, out))
    for line in log_lines(out):
        for chip in (0, 1):
            assert 0 < line[f"chip{chip}_allocated_bytes"] <= line[f"chip{chip}_peak_bytes"]


def test_pure_bf16_trains_and_saves_bf16_weights(tiny_workspace, tmp_path):
    out = tmp_path / "bf16"
    run(emu_command(tiny_workspace, out, "--pure_bf16"))
    adapter = load_file(out / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in log_lines(out))


def test_pure_bf16_is_ignored_on_the_cpu(tiny_workspace, tmp_path):
    messages = []
    run(command(tiny_workspace, tmp_path / "cpu", "lora") + ["--pure_bf16"], report=messages.append)
    assert any("--pure_bf16 is ignored on cpu" in m for m in messages)


def test_the_loss_scaler_follows_torchs_grad_scaler():
    """LossScaler (both placements' fp16 scaling) against torch.amp.GradScaler over the same
    steps, two of them overflowing: the same scale, the same skipped steps, the same weights, and
    a state GradScaler loads."""
    from chipspan.precision import LossScaler

    torch.manual_seed(0)
    start = torch.randn(8)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    our_optimizer, their_optimizer = torch.optim.SGD([ours], lr=0.1), torch.optim.SGD([theirs], lr=0.1)
    scaler, reference = (
        LossScaler(scale=2.0**4, growth_interval=3),
        torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=3),
    )
    for poisoned in (False, True, False, False, False, False, True, False, False, False):
        ((ours * ours).sum() * scaler.scale).backward()
        reference.scale((theirs * theirs).sum()).backward()
        if poisoned:
            ours.grad[0] = theirs.grad[0] = float("inf")
        overflowed = scaler.unscale([ours.grad], lambda flag: flag)
        if not overflowed:
            our_optimizer.step()
        scaler.update(overflowed)
        reference.step(their_optimizer)
        reference.update()
        assert overflowed is poisoned
        assert scaler.scale == reference.get_scale()
        assert torch.equal(ours, theirs)
        our_optimizer.zero_grad(), their_optimizer.zero_grad()
    assert scaler.skipped_steps == 2
    loaded = torch.amp.GradScaler("cpu")
    loaded.load_state_dict(scaler.state_dict()["scaler"])
    assert loaded.state_dict() == reference.state_dict()


def test_plan_and_train_refuse_two_precision_flags_alike(tiny_workspace, tmp_path, capsys):
    """`chipspan plan` once let --pure_bf16 win over --fp16 while `train` refused the pair: both refuse it now."""
    from chipspan.cli import main

    model = tiny_workspace / "model"
    assert main(["plan", "--model_name_or_path", str(model), "--fp16", "--pure_bf16", "--chip_memory", "1GiB"]) == 1
    assert capsys.readouterr().err.strip() == "chipspan: error: choose one of --fp16, --bf16 and --pure_bf16"
    out = tmp_path / "out"
    assert main(["train", *command(tiny_workspace, out, "full")[1:], "--bf16", "--pure_bf16"]) == 1
    assert capsys.readouterr().err.strip() == "chipspan: error: choose one of --fp16, --bf16 and --pure_bf16"
    assert not out.exists()
