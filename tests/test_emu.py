"""The emulated chip device `emu`: separate chips, strict cross-chip checks, per-chip memory.

The backend is compiled on first use (about a minute) and cached; these tests skip only
when this machine cannot build it (no C++ compiler or no ninja).
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import emu_chips
from torch import nn

import chipspan.emu as emu
from chipspan.emu import _build
from chipspan.errors import ChipspanError

CHIPS = 4
MiB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def chips():
    with emu_chips(CHIPS):
        yield


# --- a model spanned over four chips ------------------------------------------------------


class Block(nn.Module):
    """A pre-norm decoder block: causal self-attention and a SiLU MLP."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):  # x: (batch, seq, dim)
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.out(att.transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.silu(self.up(self.norm2(x))))


def stages(vocab=50, dim=32):
    torch.manual_seed(0)
    return nn.ModuleList(
        [nn.Embedding(vocab, dim), Block(dim), Block(dim), nn.Sequential(nn.RMSNorm(dim), nn.Linear(dim, vocab))]
    )


def run(model, devices, ids, labels):
    """Forward through the stages, each on its device, moving activations with .to()."""
    h = ids
    for stage, device in zip(model, devices):
        h = stage(h.to(device))
    return F.cross_entropy(h.flatten(0, 1), labels.to(devices[-1]).flatten())


def test_span_over_four_chips_matches_cpu():
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, dims=1)
    cpu_model = stages()
    chips = [f"emu:{i}" for i in range(CHIPS)]
    emu_model = nn.ModuleList(copy.deepcopy(s).to(c) for s, c in zip(cpu_model, chips))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (cpu_model, emu_model)]

    for step in range(2):
        losses = []
        for model, devices, opt in zip((cpu_model, emu_model), (["cpu"] * CHIPS, chips), optimizers):
            opt.zero_grad()
            loss = run(model, devices, ids, labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == losses[0], f"step {step}"  # the same CPU kernels run, so exactly equal
        for (name, p_cpu), p_emu, device in zip(
            cpu_model.named_parameters(),
            emu_model.parameters(),
            [c for s, c in zip(emu_model, chips) for _ in s.parameters()],
        ):
            assert p_emu.device == torch.device(device) and p_emu.grad.device == p_emu.device
            assert torch.equal(p_emu.grad.cpu(), p_cpu.grad), name
            assert torch.equal(p_emu.detach().cpu(), p_cpu.detach()), name


# --- a tensor left on the wrong chip --------------------------------------------------------


@pytest.mark.parametrize("op", ["cat", "mm", "where", "add"])
def test_tensor_on_the_wrong_chip_raises(op):
    a, b = torch.ones(3, 3, device="emu:1"), torch.ones(3, 3, device="emu:2")
    calls = {
        "cat": lambda: torch.cat([a, b]),
        "mm": lambda: a @ b,
        "where": lambda: torch.where(a > 0, a, b),
        "add": lambda: a + b,
    }
    with pytest.raises(RuntimeError, match="emu:1 and emu:2") as error:
        calls[op]()
    if op != "add":  # add fails in PyTorch's own device check, which does not name the op
        assert f"aten::{op}" in str(error.value)


def test_cpu_tensor_mixed_in_raises_but_scalars_and_indices_are_fine():
    x = torch.arange(6.0, device="emu:1").view(2, 3)
    with pytest.raises(RuntimeError, match="emu:1 and cpu"):
        torch.cat([x, torch.ones(2, 3)])
    assert (x * torch.tensor(2.0)).device == x.device
    assert x[torch.tensor([1, 0])].device == x.device


def test_copies_between_chips_and_host_and_views_share_memory():
    host = torch.arange(24.0).view(4, 6)
    x = host.to("emu:0")
    view = x.t()[1:3]
    assert torch.equal(view.to("emu:3").cpu(), host.t()[1:3])
    assert torch.equal(x.to("emu:2", torch.float16).cpu(), host.half())
    assert x[2, 3].item() == 15.0
    x.view(-1).unfold(0, 4, 2)[1, 0] = -1.0
    assert x[0, 2].item() == -1.0


def test_missing_chip_is_an_error():
    with pytest.raises(RuntimeError, match="emu:9 does not exist"):
        torch.empty(1, device="emu:9")


# --- memory ---------------------------------------------------------------------------------


def test_memory_is_counted_per_chip_with_peaks_and_reset():
    emu.reset_peak_memory()
    before = [emu.memory_allocated(c) for c in range(CHIPS)]
    x = torch.empty(MiB, dtype=torch.uint8, device="emu:2")
    y = torch.empty(3 * MiB, dtype=torch.uint8, device="emu:2")
    assert emu.memory_allocated(2) == before[2] + 4 * MiB
    assert [emu.memory_allocated(c) for c in (0, 1, 3)] == [before[c] for c in (0, 1, 3)]
    del x, y
    assert emu.memory_allocated(2) == before[2]
    assert emu.peak_memory(2) == before[2] + 4 * MiB
    if hasattr(torch.accelerator, "max_memory_allocated"):  # torch >= 2.9 reads the chips' allocator
        assert torch.accelerator.max_memory_allocated(2) == emu.peak_memory("emu:2")
    assert torch.get_device_module("emu").max_memory_allocated(2) == emu.peak_memory("emu:2")
    assert torch.get_device_module("emu").memory_allocated(2) == before[2]
    emu.reset_peak_memory(2)
    assert emu.peak_memory(2) == before[2]


def test_memory_limit_raises_naming_the_chip():
    emu.set_memory_limit(emu.memory_allocated(3) + MiB, chip=3)
    try:
        keep = torch.empty(MiB, dtype=torch.uint8, device="emu:3")  # exactly at the limit
        with pytest.raises(torch.OutOfMemoryError, match="emu:3 out of memory"):
            torch.empty(16, device="emu:3")
        other = torch.empty(2 * MiB, dtype=torch.uint8, device="emu:2")  # other chips have no limit
        del keep, other
    finally:
        emu.set_memory_limit(None)


def test_enable_sets_a_limit_on_every_chip_and_can_add_chips():
    emu.enable(num_chips=6, memory_limit_bytes=MiB)
    try:
        assert torch.accelerator.device_count() == 6
        with pytest.raises(torch.OutOfMemoryError, match="emu:5 out of memory"):
            torch.empty(2 * MiB, dtype=torch.uint8, device="emu:5")
        w = torch.ones(3, device="emu:5", requires_grad=True)  # backward works on added chips
        (w * 2).sum().backward()
        assert w.grad.device == torch.device("emu:5")
        with pytest.raises(ChipspanError, match="emu:5 still holds tensors"):
            emu.enable(num_chips=CHIPS)
        del w
    finally:
        emu.enable(num_chips=CHIPS)
    assert torch.accelerator.device_count() == CHIPS


def test_the_chips_keep_one_name_per_process():
    with pytest.raises(ChipspanError, match="already enabled as 'emu' in this process; it cannot become 'tpu'"):
        emu.enable(num_chips=CHIPS, device_type="tpu")
    assert torch.ones(1, device="emu:1").device == torch.device("emu", 1)  # tests/test_sophgo.py: named tpu


# --- random numbers, autocast, GradScaler, save/load, torch.accelerator --------------------


def test_manual_seed_makes_random_ops_reproducible_per_chip():
    torch.manual_seed(7)
    a0, a1 = torch.randn(5, device="emu:0"), torch.randn(5, device="emu:1")
    cpu_draw = torch.randn(5)
    torch.manual_seed(7)
    b0 = torch.randn(5, device="emu:0")
    torch.rand(100, device="emu:0")  # more draws on chip 0 leave chip 1 alone
    b1 = torch.randn(5, device="emu:1")
    assert torch.equal(a0.cpu(), b0.cpu()) and torch.equal(a1.cpu(), b1.cpu())
    assert torch.equal(a0.cpu(), a1.cpu())  # every chip is seeded alike
    assert torch.equal(cpu_draw, torch.randn(5))  # emu draws never touched the CPU generator

    state = torch.get_device_module("emu").get_rng_state(2)
    first = torch.rand(4, device="emu:2")
    torch.get_device_module("emu").set_rng_state(state, 2)
    assert torch.equal(first.cpu(), torch.rand(4, device="emu:2").cpu())


def test_autocast_runs_matmuls_in_low_precision():
    a, b = torch.randn(8, 8, device="emu:1"), torch.randn(8, 8, device="emu:1")
    with torch.autocast("emu", dtype=torch.bfloat16):
        out = a @ b
        kept = torch.exp(out)  # autocast keeps exp in float32
    assert out.dtype == torch.bfloat16 and out.device == a.device
    assert kept.dtype == torch.float32
    torch.testing.assert_close(out.float().cpu(), (a @ b).cpu(), atol=0.1, rtol=0.02)
    with torch.autocast("emu", dtype=torch.float16):
        assert F.linear(a, b).dtype == torch.float16


def test_grad_scaler_scales_steps_and_skips_infinite_steps():
    model = nn.Linear(4, 2).to("emu:2")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("emu", init_scale=1024.0)
    before = model.weight.detach().cpu().clone()
    loss = model(torch.randn(3, 4, device="emu:2")).pow(2).mean()
    scaled = scaler.scale(loss)
    assert scaled.item() == pytest.approx(loss.item() * 1024.0, rel=1e-6)
    scaled.backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model.weight.detach().cpu(), before) and scaler.get_scale() == 1024.0

    stepped = model.weight.detach().cpu().clone()
    opt.zero_grad()
    scaler.scale(model(torch.full((3, 4), float("inf"), device="emu:2")).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.weight.detach().cpu(), stepped) and scaler.get_scale() == 512.0


def test_save_and_load_keep_the_chip():
    state = {"w": torch.randn(3, 4, device="emu:1"), "ids": torch.arange(5, device="emu:3")}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert loaded["w"].device == torch.device("emu:1") and loaded["ids"].device == torch.device("emu:3")
    assert torch.equal(loaded["w"].cpu(), state["w"].cpu()) and torch.equal(loaded["ids"].cpu(), torch.arange(5))
    buffer.seek(0)
    moved = torch.load(buffer, map_location={"emu:1": "emu:2", "emu:3": "cpu"})
    assert moved["w"].device == torch.device("emu:2") and moved["ids"].device == torch.device("cpu")


def test_torch_accelerator_and_device_module_see_the_chips():
    module = torch.get_device_module("emu")
    assert torch.accelerator.device_count() == CHIPS == module.device_count()
    assert torch.accelerator.current_accelerator() == torch.device("emu")
    previous = torch.accelerator.current_device_index()
    try:
        torch.accelerator.set_device_index(2)
        assert module.current_device() == 2 and torch.empty(1, device="emu").device == torch.device("emu:2")
        with module.device(3):
            assert torch.accelerator.current_device_index() == 3
        torch.accelerator.synchronize()
        module.synchronize()
    finally:
        torch.accelerator.set_device_index(previous)


def test_without_a_compiler_enable_says_so(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert "no C++ compiler" in _build.missing_tool()
    with pytest.raises(ChipspanError, match="no C\\+\\+ compiler"):
        _build.load()


# --- a profile: the chip the emulated ones stand in for ------------------------------------------


@pytest.fixture()
def bm1684x():
    emu.enable(num_chips=CHIPS, profile="bm1684x")
    yield
    emu.enable(num_chips=CHIPS)


def test_the_bm1684x_profile_refuses_int64_on_a_chip_as_torch_tpu_does(bm1684x):
    assert emu.profile().name == "bm1684x" and emu.device_module.mem_get_info(0)[1] == 14 << 30
    made = [
        lambda: torch.arange(4, device="emu:1"),
        lambda: torch.zeros(3, dtype=torch.int64, device="emu:0"),
        lambda: torch.tensor([1, 2]).to("emu:0"),
        lambda: torch.randn(4, 5, device="emu:0").argmax(-1),  # an op whose output is int64
    ]
    for make in made:
        with pytest.raises(TypeError, match=r"emu:\d \(bm1684x\) does not support dtype Long"):
            make()
    ids = torch.tensor([3, 1, 2], dtype=torch.int32).to("emu:0")  # int32 indices are what it takes
    table = torch.randn(5, 4, device="emu:0")
    assert torch.equal(F.embedding(ids, table).cpu(), F.embedding(ids.cpu(), table.cpu()))


def test_without_a_profile_any_dtype_lives_on_a_chip_and_unknown_profiles_are_named(bm1684x, monkeypatch):
    emu.enable(num_chips=CHIPS)
    assert emu.profile().name == "plain"
    assert torch.arange(4, device="emu:0").dtype == torch.int64
    monkeypatch.setenv("CHIPSPAN_EMU_PROFILE", "bm1684x")
    emu.enable(num_chips=CHIPS, memory_limit_bytes=MiB)  # the profile from the environment, a limit given
    assert emu.profile().name == "bm1684x" and emu.device_module.mem_get_info(0)[1] == MiB
    with pytest.raises(ChipspanError, match="no emulated chip profile 'sc7': choose one of plain, bm1684x"):
        emu.enable(num_chips=CHIPS, profile="sc7")
