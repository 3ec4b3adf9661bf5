"""chipspan's AdamW (chipspan/optim/adamw.py): torch's AdamW update, stochastic rounding of bf16
and fp16 weights, resumable bit for bit from the by-name checkpoint state under another placement."""

import io

import pytest
import torch
from helpers import emu_chips
from torch import nn

import chipspan.emu as emu
from chipspan.optim import adamw
from chipspan.optim.adamw import AdamW, rounding_noise, state_bytes_of, stochastic_round
from chipspan.quant.dynamic8 import dequantize_blockwise, dynamic_map
from chipspan.train import checkpoints

CHIPS = 2


@pytest.fixture(scope="module")
def chips():
    with emu_chips(CHIPS):
        yield


@pytest.fixture(params=["whole", "chunked"])
def chunk(request, monkeypatch):
    """Parameters stepped whole, or in chunks of 512 elements (a size no tensor here is a multiple of)."""
    if request.param == "chunked":
        monkeypatch.setattr(adamw, "CHUNK", 512)
    return request.param


class LeastSquares(nn.Module):
    """y = x @ a.T @ b.T + bias: two weights of a few thousand elements (8-bit moments) and a small bias."""

    def __init__(self, dtype=torch.float32, chips=("cpu", "cpu")):
        """``a`` on ``chips[0]``, ``b`` and ``bias`` on ``chips[1]``."""
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter((0.1 * torch.randn(96, 64, generator=g)).to(chips[0], dtype))
        self.b = nn.Parameter((0.1 * torch.randn(48, 96, generator=g)).to(chips[1], dtype))
        self.bias = nn.Parameter(torch.zeros(48).to(chips[1], dtype))

    def loss(self, step: int) -> torch.Tensor:
        """The mean squared error on batch ``step`` of a fixed random linear target."""
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(16, 64, generator=g)
        target = x @ torch.randn(64, 48, generator=torch.Generator().manual_seed(7))
        device, dtype = self.a.device, self.a.dtype
        y = (x.to(device, dtype) @ self.a.T).to(self.b.device) @ self.b.T + self.bias
        return (y.float() - target.to(y.device)).pow(2).mean()


def train(model, optimizers, steps, first=0, lrs=None):
    """Step ``optimizers`` (each over some of ``model``'s parameters) ``steps`` times from step
    ``first``; ``lrs``: each step's learning rate of every group. The losses."""
    losses = []
    for step in range(first, first + steps):
        if lrs is not None:
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lrs[step]
        loss = model.loss(step)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def two_groups(model):
    """Weight decay on the weights, none on the bias (as chipspan's build_optimizer groups them)."""
    return [{"params": [model.a, model.b], "weight_decay": 0.1}, {"params": [model.bias], "weight_decay": 0.0}]


# --- 32-bit states: torch's AdamW ---------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fp32_steps_equal_torch_adamw_with_two_groups_and_a_changing_lr(chunk, weight_decay):
    ours, theirs = LeastSquares(), LeastSquares()
    settings = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    groups = lambda m: [  # noqa: E731
        {"params": [m.a, m.b], "weight_decay": weight_decay},
        {"params": [m.bias], "weight_decay": 0.0},
    ]
    lrs = [1e-2, 1e-2, 5e-3, 2e-2, 1e-3, 1e-3, 7e-3, 4e-3]
    train(ours, [AdamW(groups(ours), **settings)], 8, lrs=lrs)
    train(theirs, [torch.optim.AdamW(groups(theirs), **settings)], 8, lrs=lrs)
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-9)
    assert not torch.equal(ours.a, LeastSquares().a)  # it trained


def test_a_parameter_that_is_not_contiguous_steps_as_torch_steps_it():
    ours, theirs = (nn.Parameter(torch.randn(64, 96, generator=torch.Generator().manual_seed(0)).t()) for _ in "ab")
    optimizers = [AdamW([ours], lr=1e-2), torch.optim.AdamW([theirs], lr=1e-2)]
    for step in range(3):
        ours.grad = theirs.grad = torch.randn(96, 64, generator=torch.Generator().manual_seed(step))
        for optimizer in optimizers:
            optimizer.step()
    assert not ours.is_contiguous()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_moments_take_the_weights_dtype_as_torchs_adamw_keeps_them():
    """bf16 weights (--pure_bf16) keep bf16 moments: the plan prices 2 bytes per moment, as for torch's."""
    model = LeastSquares(torch.bfloat16)
    optimizer = AdamW(model.parameters())
    train(model, [optimizer], 1)
    state = optimizer.state[model.a]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert state["exp_avg"].shape == model.a.shape and model.a.dtype == torch.bfloat16


# --- 8-bit states ---------------------------------------------------------------------------------


def test_8bit_states_track_torch_adamw_on_a_least_squares_problem(chunk):
    """100 steps at lr 1e-2 (the loss falls from 68 to 0.6): every step's loss within 2% of fp32
    AdamW's (measured: 0.7% at most) and each final weight within 4% of fp32 AdamW's, as the norm
    of the difference over the norm of the weight (measured: 1.8%)."""
    ours, theirs = LeastSquares(), LeastSquares()
    losses = train(ours, [AdamW(two_groups(ours), lr=1e-2, state_bits=8)], 100)
    reference = train(theirs, [torch.optim.AdamW(two_groups(theirs), lr=1e-2)], 100)
    assert reference[-1] < reference[0] / 100
    assert losses == pytest.approx(reference, rel=0.02)
    for mine, exact in zip(ours.parameters(), theirs.parameters()):
        assert (mine - exact).norm() <= 0.04 * exact.norm()


def test_8bit_states_take_one_byte_per_element_and_moment_plus_block_scales():
    model = LeastSquares()
    optimizer = AdamW(two_groups(model), state_bits=8)
    train(model, [optimizer], 1)
    for p in model.parameters():
        state = optimizer.state[p]
        on_chip = sum(t.numel() * t.element_size() for t in state.values() if t.dim() > 0)
        assert on_chip == state_bytes_of(p.numel(), 8)
    a = optimizer.state[model.a]
    assert a["exp_avg"].dtype == a["exp_avg_sq"].dtype == torch.uint8 and a["exp_avg"].numel() == model.a.numel()
    assert state_bytes_of(model.a.numel(), 8) == 2 * (6144 + 4 * 24)  # 1.016 bytes per element and moment
    assert optimizer.state[model.bias]["exp_avg"].dtype == torch.float32  # under 4096 elements


def test_one_8bit_step_equals_bitsandbytes_adamw8bit(chunk):
    """The same weights and block scales as bitsandbytes' AdamW8bit after one step; the codes are
    its codes except where its binary search missed the nearest code value, which ours take."""
    bnb = pytest.importorskip("bitsandbytes")
    ours, theirs = LeastSquares(), LeastSquares()
    optimizer = AdamW([ours.a], lr=1e-2, weight_decay=0.1, state_bits=8)
    reference = bnb.optim.AdamW8bit([theirs.a], lr=1e-2, weight_decay=0.1)
    train(ours, [optimizer], 1)
    train(theirs, [reference], 1)
    torch.testing.assert_close(ours.a, theirs.a, rtol=0, atol=1e-7)
    fresh = LeastSquares()
    fresh.loss(0).backward()
    grad = fresh.a.grad.reshape(-1)
    exact = {"exp_avg": 0.1 * grad, "exp_avg_sq": 0.001 * grad * grad}
    for (key, signed), theirs_key in zip(adamw.MOMENTS, ["1", "2"]):
        mine, bnb_state = optimizer.state[ours.a], reference.state[theirs.a]
        torch.testing.assert_close(mine[f"{key}_absmax"], bnb_state["absmax" + theirs_key], rtol=1e-6, atol=0)
        code, absmax = dynamic_map(signed), mine[f"{key}_absmax"]
        normalized = exact[key] / absmax.repeat_interleave(adamw.BLOCK)
        codes, bnb_codes = mine[key], bnb_state["state" + theirs_key].reshape(-1)
        distance, bnb_distance = ((code[c.long()] - normalized).abs() for c in (codes, bnb_codes))
        assert (distance <= bnb_distance + 1e-9).all()
        assert (codes == bnb_codes).float().mean() > 0.95
        back = dequantize_blockwise(codes, absmax, code, adamw.BLOCK, (codes.numel(),), torch.float32)
        assert ((back - exact[key]).abs() <= absmax.repeat_interleave(adamw.BLOCK) * 0.01).all()


# --- stochastic rounding ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_updates_far_below_half_an_ulp_move_the_weights_only_with_stochastic_rounding(dtype):
    """Weights of 1.0 and a constant gradient: AdamW moves each by lr = 1e-4 a step, an eightieth
    of bf16's ulp below 1.0 (2**-8; fp16's is 2**-11). Rounded to nearest they never move; rounded
    stochastically their mean follows fp32 AdamW within 1e-3 (10 standard deviations)."""
    weights = {sr: nn.Parameter(torch.ones(4096, dtype=dtype)) for sr in (False, True)}
    exact = nn.Parameter(torch.ones(4096))
    optimizers = [AdamW([weights[sr]], lr=1e-4, weight_decay=0.0, stochastic_rounding=sr) for sr in (False, True)]
    optimizers.append(torch.optim.AdamW([exact], lr=1e-4, weight_decay=0.0))
    for _ in range(50):
        for w in (*weights.values(), exact):
            w.grad = torch.ones_like(w)
        for optimizer in optimizers:
            optimizer.step()
    assert torch.equal(weights[False], torch.ones_like(weights[False]))
    assert exact.mean().item() == pytest.approx(1 - 50e-4, abs=1e-5)
    assert weights[True].float().mean().item() == pytest.approx(exact.mean().item(), abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_picks_one_of_the_two_neighbours(dtype):
    """500 values, each rounded 2000 times: every result is the nearest value or the one beyond it,
    and the mean of the results equals the value within 6 standard deviations of the mean."""
    draws = 2000
    g = torch.Generator().manual_seed(0)
    values = torch.randn(500, generator=g) * torch.logspace(-3, 3, 500)
    repeated = values.repeat(draws)
    results = stochastic_round(
        repeated, dtype, rounding_noise(seed=5, step=1, offset=0, count=repeated.numel(), device="cpu")
    )
    nearest = values.to(dtype)
    beyond = torch.nextafter(nearest, torch.where(values > nearest.float(), torch.inf, -torch.inf).to(dtype))
    outcomes = results.view(draws, -1)
    assert ((outcomes == nearest) | (outcomes == beyond)).all()
    gap = (beyond.float() - nearest.float()).abs()
    chance = (values - nearest.float()).abs() / gap
    spread = gap * (chance * (1 - chance) / draws).sqrt()
    error = (outcomes.float().mean(0) - values).abs()
    assert (error <= 6 * spread + 1e-12 * values.abs()).all()
    assert (outcomes == beyond).any(0).sum() > 400  # most values were rounded both ways


def test_values_exact_in_the_dtype_are_kept():
    values = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, float("inf"), -float("inf")]).bfloat16().float()
    noise = torch.full_like(values, 0.999)
    assert torch.equal(stochastic_round(values, torch.bfloat16, noise).float(), values)
    assert stochastic_round(torch.tensor([float("nan")]), torch.bfloat16, torch.zeros(1)).isnan().all()


def test_rounding_noise_is_reproducible_and_differs_by_seed_step_and_offset():
    noise = rounding_noise(seed=3, step=2, offset=0, count=1 << 12, device="cpu")
    assert 0 <= noise.min() and noise.max() < 1
    assert torch.equal(rounding_noise(3, 2, 0, 1 << 12, "cpu"), noise)
    for other in [(4, 2, 0), (3, 3, 0), (3, 2, 1 << 12)]:  # another seed, step, chunk
        assert not torch.isclose(rounding_noise(*other, 1 << 12, "cpu"), noise).any()


# --- determinism, checkpoints and placements --------------------------------------------------------


def sr_optimizer(named_params, **settings):
    return AdamW(named_params, lr=3e-3, weight_decay=0.1, stochastic_rounding=True, seed=42, **settings)


def test_named_parameters_give_the_same_rounding_in_one_optimizer_or_one_per_stage(chunk):
    """Seeded by name: a fresh run rounds the same whether one optimizer holds every parameter (in
    two groups, as build_optimizer makes them) or each stage has its own (as under torchrun)."""
    whole, staged = LeastSquares(torch.bfloat16), LeastSquares(torch.bfloat16)
    groups = lambda *named: [{"params": named[:-1]}, {"params": named[-1:], "weight_decay": 0.0}]  # noqa: E731
    train(whole, [sr_optimizer(groups(("a", whole.a), ("b", whole.b), ("bias", whole.bias)))], 5)
    optimizers = [sr_optimizer([("a", staged.a)]), sr_optimizer(groups(("b", staged.b), ("bias", staged.bias)))]
    train(staged, optimizers, 5)
    for mine, reference in zip(staged.parameters(), whole.parameters()):
        assert torch.equal(mine, reference)
    assert all("param_names" not in g for o in optimizers for g in o.param_groups)
    assert optimizers[1].param_groups[0]["params"] == [staged.b]


def stages_of(model, names_per_stage):
    """Modules standing for pipeline stages: each holds some of ``model``'s parameters under their
    whole-model names (what chipspan's checkpoints key the optimizer state by)."""
    stages = []
    for names in names_per_stage:
        stage = nn.Module()
        for name in names:
            stage.register_parameter(name, getattr(model, name))
        stages.append(stage)
    return stages


def save_checkpoint(folder, stages, optimizer, scheduler):
    """The optimizer and scheduler files chipspan's checkpoints write."""
    folder.mkdir()
    torch.save(checkpoints.optimizer_state_by_name(stages, optimizer), folder / checkpoints.OPTIMIZER_FILE)
    torch.save(scheduler.state_dict(), folder / checkpoints.SCHEDULER_FILE)


def halve_every_step(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)


@pytest.mark.parametrize("state_bits", [32, 8])
def test_a_run_resumed_from_the_saved_state_on_two_stages_continues_bit_for_bit(tmp_path, chunk, state_bits):
    """Six steps in one optimizer, against three, a checkpoint, and three more with one optimizer
    per stage loaded from it (seeds from the parameters' order, so only the state can carry them)."""
    whole = LeastSquares(torch.bfloat16)
    optimizer = sr_optimizer(whole.parameters(), state_bits=state_bits)
    scheduler = halve_every_step(optimizer)
    for step in range(6):
        train(whole, [optimizer], 1, first=step)
        scheduler.step()

    first = LeastSquares(torch.bfloat16)
    optimizer = sr_optimizer(first.parameters(), state_bits=state_bits)
    scheduler = halve_every_step(optimizer)
    for step in range(3):
        train(first, [optimizer], 1, first=step)
        scheduler.step()
    save_checkpoint(tmp_path / "checkpoint-3", stages_of(first, [["a", "b", "bias"]]), optimizer, scheduler)

    resumed = LeastSquares(torch.bfloat16)
    resumed.load_state_dict(first.state_dict())
    stages = stages_of(resumed, [["b", "bias"], ["a"]])  # another order, other optimizers
    optimizers = [sr_optimizer(stage.parameters(), state_bits=state_bits) for stage in stages]
    schedulers = [halve_every_step(o) for o in optimizers]
    for stage, o, s in zip(stages, optimizers, schedulers):
        checkpoints.load_optimizer_state([stage], o, s, tmp_path / "checkpoint-3")
    for step in range(3, 6):
        train(resumed, optimizers, 1, first=step)
        for s in schedulers:
            s.step()
    for mine, reference in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(mine, reference)
    assert optimizers[1].state[resumed.a]["rounding_seed"].dtype == torch.int64


@pytest.mark.parametrize("state_bits", [32, 8])
def test_torchs_state_dict_round_trip_continues_bit_for_bit(state_bits):
    """optimizer.state_dict(), through torch.save and a weights-only torch.load, into a new
    optimizer: the state of the bf16 weights keeps its dtypes (torch's own load casts every state
    tensor to bf16) and the run goes on unchanged."""
    whole = LeastSquares(torch.bfloat16)
    train(whole, [sr_optimizer(whole.parameters(), state_bits=state_bits)], 6)
    first = LeastSquares(torch.bfloat16)
    optimizer = sr_optimizer(first.parameters(), state_bits=state_bits)
    train(first, [optimizer], 3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed = LeastSquares(torch.bfloat16)
    resumed.load_state_dict(first.state_dict())
    optimizer = sr_optimizer(resumed.parameters(), state_bits=state_bits)
    optimizer.load_state_dict(torch.load(buffer, weights_only=True))
    state = optimizer.state[resumed.a]
    assert state["exp_avg"].dtype == (torch.uint8 if state_bits == 8 else torch.bfloat16)
    assert state["rounding_seed"].dtype == torch.int64 and state["step"].dtype == torch.float32
    train(resumed, [optimizer], 3, first=3)
    for mine, reference in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(mine, reference)


# --- the emulated chips -----------------------------------------------------------------------------


@pytest.mark.parametrize("state_bits", [32, 8])
def test_steps_on_two_emulated_chips_equal_the_cpu_bit_for_bit(chips, state_bits):
    """The weights on emu:0 and emu:1 (the bias with b): the rounding noise and the moments come out
    the same as on the CPU, and every state tensor with a dimension stays on its parameter's chip."""
    cpu, spanned = LeastSquares(torch.bfloat16), LeastSquares(torch.bfloat16, chips=("emu:0", "emu:1"))
    cpu_losses = train(cpu, [sr_optimizer(list(cpu.named_parameters()), state_bits=state_bits)], 4)
    optimizer = sr_optimizer(list(spanned.named_parameters()), state_bits=state_bits)
    emu_losses = train(spanned, [optimizer], 4)
    assert emu_losses == pytest.approx(cpu_losses, rel=1e-6)
    for mine, reference in zip(spanned.parameters(), cpu.parameters()):
        assert torch.equal(mine.cpu(), reference)
    for p in spanned.parameters():
        assert all(t.device == p.device for t in optimizer.state[p].values() if t.dim() > 0)


@pytest.mark.parametrize(
    "dtype, state_bits, stochastic_rounding",
    [
        (torch.float32, 32, False),
        (torch.float32, 8, False),
        (torch.bfloat16, 32, False),
        (torch.bfloat16, 8, False),
        (torch.bfloat16, 32, True),
        (torch.bfloat16, 8, True),
    ],
)
def test_a_step_needs_a_chunk_of_scratch_on_the_chip_as_step_scratch_bytes_says(
    chips, monkeypatch, dtype, state_bits, stochastic_rounding
):
    """A step of a 2**18-element weight on emu:0, 2**12 elements at a time: its peak beyond what the
    chip held is at most step_scratch_bytes and at least 85% of it, and (8-bit) under a quarter of
    what fp32 moments would take (2 MiB); the step leaves nothing behind."""
    monkeypatch.setattr(adamw, "CHUNK", 1 << 12)
    weight = nn.Parameter(torch.randn(1 << 18, device="emu:0").to(dtype))
    weight.grad = torch.randn_like(weight)
    optimizer = AdamW([weight], state_bits=state_bits, stochastic_rounding=stochastic_rounding)
    optimizer.step()  # the states exist from here on
    emu.reset_peak_memory(0)
    held = emu.memory_allocated(0)
    optimizer.step()
    scratch = emu.peak_memory(0) - held
    bound = adamw.step_scratch_bytes(weight.numel(), dtype, state_bits, stochastic_rounding)
    assert 0.85 * bound <= scratch <= bound
    assert state_bits == 32 or scratch < 8 * weight.numel() / 4
    assert emu.memory_allocated(0) == held
