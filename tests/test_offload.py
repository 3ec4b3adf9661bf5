"""The host-offloaded AdamW (chipspan.optim.offload): torch's AdamW updates with the master weights and
moments in host memory, stepped by a worker per chip while the chips go on."""

import copy
import threading
import time

import pytest
import torch
from helpers import TOY, batch
from torch import nn

from chipspan import emu
from chipspan.chips.placement import even_placement
from chipspan.chips.span import SpannedModel
from chipspan.models.config import ModelConfig
from chipspan.models.decoder import CausalLM
from chipspan.optim import offload
from chipspan.optim.offload import HOST_TENSORS, HostOffloadedAdamW, host_bytes_of
from chipspan.train.checkpoints import OPTIMIZER_FILE, SCHEDULER_FILE, load_optimizer_state, optimizer_state_by_name
from chipspan.train.optim import kind_of
from chipspan.train.schedule import build_scheduler

CONFIG = ModelConfig.from_dict(
    {**TOY, "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}
)
STEPS = 5
WEIGHT_DECAY = 0.1


def two_chips(kind: str) -> list[torch.device]:
    """Two chips of ``kind``: the CPU twice, emu:0 and emu:1, or CUDA's first two (one, twice)."""
    if kind == "emu":
        if not emu.is_available():
            pytest.skip("the emu device cannot be built here (no C++ compiler?)")
        emu.enable(num_chips=2)
        return [torch.device("emu", 0), torch.device("emu", 1)]
    if kind == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device here")
        return [torch.device("cuda", i % torch.cuda.device_count()) for i in range(2)]
    return [torch.device("cpu")] * 2


@pytest.fixture(params=["cpu", "emu", "cuda"])
def chips(request) -> list[torch.device]:
    return two_chips(request.param)


@pytest.fixture(params=["emu", "cuda"])
def accelerator_chips(request) -> list[torch.device]:
    return two_chips(request.param)


def spanned(chips: list[torch.device], dtype=torch.float32, seed=0) -> SpannedModel:
    """CONFIG's model, randomly initialized from ``seed``, in ``dtype``, one stage per chip."""
    torch.manual_seed(seed)
    placement = even_placement(CONFIG, chips)
    last = len(chips) - 1
    stages = [
        CausalLM(CONFIG, layers, embed=i == 0, head=i == last).to(device, dtype)
        for i, (device, layers) in enumerate(zip(placement.devices, placement.layers))
    ]
    return SpannedModel(stages, placement)


def groups(model: nn.Module) -> list[dict]:
    """AdamW's two groups as chipspan builds them: weight decay on all but biases and norm weights."""
    kinds = {"decay": [], "no_decay": []}
    for name, param in model.named_parameters():
        kinds[kind_of(name)].append(param)
    return [
        {"params": kinds["decay"], "weight_decay": WEIGHT_DECAY},
        {"params": kinds["no_decay"], "weight_decay": 0.0},
    ]


def offloaded(model: SpannedModel) -> HostOffloadedAdamW:
    return HostOffloadedAdamW(groups(model), lr=1e-2, modules=[model])


def schedule(optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return build_scheduler(optimizer, "cosine", STEPS, warmup_steps=2)


def train(model, optimizer, scheduler, steps: range) -> list[tuple[float, float]]:
    """Optimizer steps ``steps`` (their batches drawn from the step number); (loss, lr) of each."""
    seen = []
    for step in steps:
        ids, labels = batch(CONFIG.vocab_size, seed=step)
        loss = model(ids, labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seen.append((loss.item(), scheduler.get_last_lr()[0]))
    return seen


def test_steps_equal_torch_adamw_with_weight_decay_groups_and_schedule(chips):
    model = spanned(chips)
    reference = copy.deepcopy(model)
    ours, theirs = offloaded(model), torch.optim.AdamW(groups(reference), lr=1e-2)
    seen = train(model, ours, schedule(ours), range(STEPS))
    expected = train(reference, theirs, schedule(theirs), range(STEPS))
    ours.synchronize()

    assert [lr for _, lr in seen] == [lr for _, lr in expected]
    assert len({lr for _, lr in seen}) > 2  # the warm-up and the cosine decay were followed
    assert [loss for loss, _ in seen] == pytest.approx([loss for loss, _ in expected], abs=1e-6)
    for (name, mine), theirs_ in zip(model.named_parameters(), reference.parameters()):
        assert mine.device == theirs_.device
        assert (mine.detach().cpu() - theirs_.detach().cpu()).abs().max() <= 1e-6, name


def test_bf16_weights_learn_from_updates_below_their_precision(chips):
    # A constant gradient: each AdamW step moves a weight by about lr = 1e-3, far below half of
    # bf16's spacing just under 1.0 (2^-8), so in bf16 alone every update rounds away.
    weight = nn.Parameter(torch.ones(16, dtype=torch.bfloat16, device=chips[0]))
    plain = nn.Parameter(weight.detach().clone())
    fp32 = nn.Parameter(weight.detach().float().cpu())
    optimizers = [
        (weight, HostOffloadedAdamW([weight], lr=1e-3, weight_decay=0.0)),
        (plain, torch.optim.AdamW([plain], lr=1e-3, weight_decay=0.0)),
        (fp32, torch.optim.AdamW([fp32], lr=1e-3, weight_decay=0.0)),
    ]
    for _ in range(12):
        for param, optimizer in optimizers:
            param.float().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    optimizers[0][1].synchronize()

    master = optimizers[0][1].state[weight]["master"]
    assert torch.equal(plain.detach().cpu(), torch.ones(16, dtype=torch.bfloat16))
    assert (master - fp32.detach()).abs().max() <= 1e-6  # the master followed fp32 AdamW: about 1 - 12e-3
    assert torch.equal(weight.detach().cpu(), master.to(torch.bfloat16))  # the chip holds the master, rounded
    assert (weight.detach().cpu() < 1).all()


def test_no_optimizer_tensor_stays_on_a_chip(accelerator_chips):
    model = spanned(accelerator_chips)
    optimizer = offloaded(model)
    before = [chip_bytes(chip) for chip in accelerator_chips]
    train(model, optimizer, schedule(optimizer), range(2))
    optimizer.synchronize()

    trained = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(p.grad is None for p in trained)
    assert [chip_bytes(chip) for chip in accelerator_chips] == before  # no gradient, moment or master there
    held = 0
    for param in trained:
        state = optimizer.state[param]
        assert sorted(state) == sorted([*HOST_TENSORS, "step"])
        assert all(t.device == torch.device("cpu") for t in state.values())
        for key in HOST_TENSORS:
            assert state[key].shape == param.shape and state[key].dtype == torch.float32
            assert state[key].is_pinned() == (param.device.type == "cuda")
            held += state[key].nbytes
    numel = sum(p.numel() for p in trained)
    assert host_bytes_of(numel) == held + 4 * numel  # and the fp32 staging of each gradient


def chip_bytes(chip: torch.device) -> int:
    return emu.memory_allocated(chip) if chip.type == "emu" else torch.cuda.memory_allocated(chip)


def test_a_forward_waits_for_its_parameters_updates(chips, monkeypatch):
    release, written = threading.Event(), []

    def slow_copy_to_chip(param, source):  # half the tensor, a pause, the other half
        assert release.wait(timeout=60)
        half = param.shape[0] // 2
        param[:half].copy_(source[:half])
        time.sleep(0.01)
        param[half:].copy_(source[half:])
        written.append(param)

    monkeypatch.setattr(offload, "_copy_to_chip", slow_copy_to_chip)
    model = spanned(chips)
    reference = copy.deepcopy(model)
    ours, theirs = offloaded(model), torch.optim.AdamW(groups(reference), lr=1e-2)
    for optimizer, net in ((ours, model), (theirs, reference)):
        ids, labels = batch(CONFIG.vocab_size, seed=0)
        net(ids, labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert written == []  # step() returned while every update was still to come

    threading.Timer(0.1, release.set).start()
    ids, labels = batch(CONFIG.vocab_size, seed=1)
    loss = model(ids, labels)  # each module waits for its own parameters, the loss for the head's
    trained = [p for group in ours.param_groups for p in group["params"]]
    assert len(written) == len(trained)
    assert loss.item() == pytest.approx(reference(ids, labels).item(), abs=1e-6)


def test_a_workers_error_reaches_the_training_loop(monkeypatch):
    def fail(state, grad, settings):
        raise RuntimeError("host out of memory")

    monkeypatch.setattr(offload, "_adamw", fail)
    model = spanned(two_chips("cpu"))
    optimizer = offloaded(model)
    ids, labels = batch(CONFIG.vocab_size)
    model(ids, labels).backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="host out of memory"):
        model(ids, labels)  # the forward that would have read the stale weights
    with pytest.raises(RuntimeError, match="host out of memory"):
        optimizer.synchronize()


@pytest.mark.parametrize("restore", ["by_name", "state_dict"])
def test_a_resumed_run_continues_exactly(chips, tmp_path, restore):
    # bf16 weights: the masters hold what the weights cannot, so only a state that keeps them resumes exactly
    model = spanned(chips, torch.bfloat16)
    optimizer = offloaded(model)
    train(model, optimizer, schedule(optimizer), range(STEPS))
    optimizer.synchronize()

    stopped = spanned(chips, torch.bfloat16)
    first = offloaded(stopped)
    first_schedule = schedule(first)
    train(stopped, first, first_schedule, range(2))
    save(restore, stopped, first, first_schedule, tmp_path)

    resumed = spanned(chips, torch.bfloat16, seed=1)
    with torch.no_grad():
        for mine, saved in zip(resumed.parameters(), stopped.parameters()):
            mine.copy_(saved)
    again = offloaded(resumed)
    again_schedule = schedule(again)
    load(restore, resumed, again, again_schedule, tmp_path)
    assert all(t.device == torch.device("cpu") for state in again.state.values() for t in state.values())
    train(resumed, again, again_schedule, range(2, STEPS))
    again.synchronize()

    for (name, mine), expected in zip(resumed.named_parameters(), model.parameters()):
        assert torch.equal(mine, expected), name
        assert torch.equal(again.state[mine]["master"], optimizer.state[expected]["master"]), name


def save(restore: str, model: SpannedModel, optimizer, scheduler, folder) -> None:
    """What a checkpoint saves of the optimizer and the schedule: by parameter name, or torch's state_dict."""
    optimizer.synchronize()
    state = optimizer_state_by_name(list(model.stages), optimizer) if restore == "by_name" else optimizer.state_dict()
    torch.save(state, folder / OPTIMIZER_FILE)
    torch.save(scheduler.state_dict(), folder / SCHEDULER_FILE)


def load(restore: str, model: SpannedModel, optimizer, scheduler, folder) -> None:
    if restore == "by_name":
        load_optimizer_state(list(model.stages), optimizer, scheduler, folder)
        return
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True))
    scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=True))
