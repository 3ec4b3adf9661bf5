"""--optimizer_in_bwd: each weight steps inside backward. It trains as stepping after backward does
(tied embeddings too), resumes, runs under torchrun, and is refused, before anything loads, with what
needs every gradient of a step at once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import losses, needs_few_micro_batches, one_process, torchrun, train_flags
from safetensors.torch import load_file

from chipspan.args import parse_run_arguments
from chipspan.errors import ChipspanError
from chipspan.optim.adamw import AdamW
from chipspan.optim.in_backward import StepInBackward
from chipspan.train.recipe import run_train

IN_BACKWARD = ["--optimizer_in_bwd", "--gradient_accumulation_steps", "1", "--max_grad_norm", "0"]
STEPPED_AFTER = ["--gradient_accumulation_steps", "1", "--max_grad_norm", "0"]


def _weights(out):
    return load_file(out / "model.safetensors")


TWO_CHIPS = ["--chips", "0-1", "--device", "cpu"]


@pytest.mark.parametrize(
    "workspace, flags",
    [
        ("tiny_workspace", ["--optim", "adamw_8bit"]),  # chipspan's AdamW both ways
        ("tiny_workspace", [*TWO_CHIPS, "--micro_batches", "2"]),  # one backward over both micro-batches
        ("tiny_workspace", ["--finetuning_type", "freeze", *TWO_CHIPS]),
        ("tied_workspace", TWO_CHIPS),  # the embedding's two copies step after backward, summed
        ("tied_workspace", []),  # one matrix, used twice: it steps once its two gradients are in
    ],
)
def test_stepping_in_backward_trains_exactly_as_stepping_after_it(request, tmp_path, workspace, flags):
    """The same losses and weights, bit for bit (torch's AdamW and chipspan's compute one update)."""
    workspace = request.getfixturevalue(workspace)
    after, inside = tmp_path / "after", tmp_path / "inside"
    one_process(train_flags(workspace, after, *STEPPED_AFTER, *flags))
    one_process(train_flags(workspace, inside, *IN_BACKWARD, *flags))
    assert losses(inside) == losses(after)
    ours, theirs, base = _weights(inside), _weights(after), _weights(workspace / "model")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(not torch.equal(ours[k], base[k]) for k in ours)  # it trained


@pytest.mark.parametrize("first", [IN_BACKWARD, STEPPED_AFTER])
def test_a_run_stepped_in_backward_resumes_as_if_never_stopped(tiny_workspace, tmp_path, first):
    """Its own checkpoint, or one written stepping after backward: AdamW's state is the same."""
    out = tmp_path / "out"
    one_process(train_flags(tiny_workspace, out, *first))
    straight = losses(out)
    one_process(train_flags(tiny_workspace, out, *IN_BACKWARD, "--resume_from_checkpoint", out / "checkpoint-2"))
    assert losses(out) == straight


@pytest.mark.multiprocess
@needs_few_micro_batches  # one backward per step: one micro-batch over two stages
def test_stepping_in_backward_under_torchrun_equals_one_process(tied_workspace, tmp_path):
    """Two ranks, the tied embedding's copies on both: summed over the ranks, then stepped."""
    single, staged = tmp_path / "single", tmp_path / "staged"
    one_process(train_flags(tied_workspace, single, *IN_BACKWARD, *TWO_CHIPS))
    gpipe = ["--pipeline_schedule", "gpipe", "--micro_batches", "1"]
    torchrun("-m", "chipspan", "train", *train_flags(tied_workspace, staged, *IN_BACKWARD, *gpipe))
    assert losses(staged) == pytest.approx(losses(single), rel=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gradient_accumulation_steps", "2"], "cannot go with --gradient_accumulation_steps 2"),
        (["--max_grad_norm", "1"], "cannot go with --max_grad_norm 1: clipping by the global norm"),
        (["--fp16", "--device", "emu"], "cannot go with --fp16: the loss scaler"),  # the CPU ignores --fp16
        (["--offload_optimizer"], "cannot go with --offload_optimizer"),
        (["--launcher", "torchrun", "--micro_batches", "2"], "cannot go with --micro_batches 2: under torchrun"),
        (["--launcher", "torchrun", "--micro_batches", "1"], "cannot go with --pipeline_schedule 1f1b"),
        (["--launcher", "torchrun", "--data_parallel", "2", "--micro_batches", "1"], "--data_parallel 2"),
    ],
)
def test_what_needs_every_gradient_at_once_is_refused_before_loading(
    tiny_workspace, tmp_path, no_weight_loading, flags, message
):
    argv = [str(a) for a in train_flags(tiny_workspace, tmp_path / "out", *IN_BACKWARD, *flags)]
    with pytest.raises(ChipspanError) as refused:
        run_train(parse_run_arguments(argv, {}), report=lambda _: None)
    assert message in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_a_non_finite_gradient_is_not_applied_and_the_rest_step():
    torch.manual_seed(0)
    finite, broken = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8))
    reference = torch.nn.Parameter(finite.detach().clone())
    optimizer = AdamW([finite, broken], lr=0.1, weight_decay=0.0)
    stepper = StepInBackward(optimizer, SimpleNamespace(trained=[finite, broken], embedding_copies=[], head_copies=[]))
    start, before = finite.detach().clone(), broken.detach().clone()
    (finite.square().sum() + (broken * torch.tensor(float("nan"))).sum()).backward()
    norms, stepped = stepper.finish_step()
    assert stepped == 1 and finite.grad is None and broken.grad is None
    assert torch.equal(broken.detach(), before)
    check = AdamW([reference], lr=0.1, weight_decay=0.0)
    reference.square().sum().backward()
    check.step()
    assert torch.equal(finite.detach(), reference.detach())
    assert float(norms[0]) == pytest.approx(float((2 * start).norm()))
    assert torch.isnan(norms[1])
