"""Quantized weights (chipspan.quant) against bitsandbytes' CPU path, the test-only reference.

bitsandbytes is imported here only; chipspan never imports it.
"""

from functools import partial

import bitsandbytes.functional as bnb
import hypothesis
import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.backends.default import ops as bnb_torch_ops
from helpers import emu_chips
from hypothesis import strategies as st
from torch._subclasses import FakeTensorMode

import chipspan.emu as emu
from chipspan.errors import ChipspanError
from chipspan.quant import (
    QuantizedLinear,
    QuantSettings,
    chunk_rows,
    dequantize_chunk_bytes,
    dynamic8,
    fourbit,
    linear,
    quantize_transient_bytes,
    quantized_bytes_of,
)
from chipspan.quant.dynamic8 import dequantize_blockwise, dynamic_map, quantize_blockwise

CHIPS = 2
SETTINGS = [QuantSettings(4, "nf4"), QuantSettings(4, "fp4"), QuantSettings(4, "nf4", True), QuantSettings(8)]
IDS = ["nf4", "fp4", "nf4-double", "int8"]


@pytest.fixture(scope="module")
def chips():
    """Emulated chips emu:0, emu:1 (as tests/test_emu.py gets them), for the tests that ask."""
    with emu_chips(CHIPS):
        yield


def weight(shape, dtype=torch.float32, seed=0):
    """A random weight like a trained layer's: normal, std 0.05."""
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def bnb_nearest_blockwise(x, code, block):
    """bitsandbytes' exact-nearest block-wise quantizer: its CPU op's generic path (taken for fp64
    input; the values are x's fp32 ones), which scales by 1/absmax and picks the nearest code."""
    codes, absmax = torch.ops.bitsandbytes.quantize_blockwise(x.double(), code.clone(), block)
    return codes.reshape(-1), absmax


def bnb_dequantized_4bit(packed, state):
    """bnb's reading of a 4-bit weight, (state.shape): its CPU kernel, or, for rows that are no
    multiple of 64 long, its pure-PyTorch path (there, on an AVX-512 machine, the kernel scales
    some blocks by another block's absmax: (8, 16) reads its second block with the first's)."""
    if state.shape[-1] % 64 == 0:
        return bnb.dequantize_4bit(packed, state).reshape(state.shape)
    absmax = state.absmax
    if state.nested:
        absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = bnb.get_4bit_type(state.quant_type, device="cpu")
    compute = bnb_torch_ops._dequantize_4bit_compute.__wrapped__  # not torch.compile'd: seconds a shape
    return compute(packed.view(-1), absmax, code, 64, state.shape, state.dtype)


# --- the 8-bit dynamic code ------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes_table(signed):
    ours = dynamic_map(signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, bnb.create_dynamic_map(signed))
    assert bool((ours[1:] > ours[:-1]).all())  # ascending, no value twice


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(("n", "block"), [(4096, 256), (1000, 256), (777, 64), (5, 2048)])
def test_blockwise_codes_and_absmax_equal_bitsandbytes_nearest(signed, n, block):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
    x = x if signed else x.abs()
    code = dynamic_map(signed)
    codes, absmax = quantize_blockwise(x, code, block)
    want_codes, want_absmax = bnb_nearest_blockwise(x, code, block)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-n // block),)
    assert torch.equal(absmax, want_absmax)
    assert torch.equal(codes, want_codes)


def assert_nearer_or_equal(ours, theirs, x, absmax, block):
    """Where two 8-bit quantizations of x differ, ours is the nearer code (within fp32 rounding)."""
    code = dynamic_map(True)
    normalized = torch.nn.functional.pad(x, (0, -x.numel() % block)).view(-1, block) / absmax[:, None]
    normalized = normalized.view(-1)[: x.numel()]
    ours_off = (code[ours.long()] - normalized).abs()
    theirs_off = (code[theirs.long()] - normalized).abs()
    assert bool((ours_off <= theirs_off + 1e-7).all())
    assert (ours.int() - theirs.int()).abs().max() <= 1  # a neighbouring code at most


def test_blockwise_never_farther_than_bitsandbytes_binary_search():
    # bnb's compiled CPU quantizer finds the code by an approximate search: on about 0.15% of
    # values it stores a neighbour of the nearest code. Ours is the nearest, never farther.
    x = torch.randn(64 * 1024, generator=torch.Generator().manual_seed(3))
    codes, absmax = quantize_blockwise(x, dynamic_map(True), 256)
    theirs, state = bnb.quantize_blockwise(x, code=dynamic_map(True), blocksize=256)
    assert torch.equal(absmax, state.absmax)
    assert_nearer_or_equal(codes, theirs, x, absmax, 256)
    assert (codes != theirs).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_blockwise_equals_bitsandbytes(dtype):
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(4))
    code = dynamic_map(True)
    codes, absmax = quantize_blockwise(x, code, 256)
    ours = dequantize_blockwise(codes, absmax, code, 256, x.shape, dtype)
    want = bnb.dequantize_blockwise(codes.view(x.shape), absmax=absmax, code=code.clone(), blocksize=256)
    assert ours.shape == x.shape and ours.dtype == dtype
    assert torch.equal(ours, want.to(dtype))
    assert (ours.float() - x).abs().max() < 0.02 * x.abs().max()


def test_all_zero_block_reads_back_as_zeros():
    x = torch.cat([torch.zeros(256), torch.randn(100)])
    code = dynamic_map(True)
    codes, absmax = quantize_blockwise(x, code, 256)
    assert absmax[0] == 0 and bool((code[codes[:256].long()] == 0).all())
    back = dequantize_blockwise(codes, absmax, code, 256, x.shape, torch.float32)
    assert torch.equal(back[:256], torch.zeros(256)) and bool(back[256:].ne(0).any())


def test_blockwise_in_pieces_equals_all_at_once(monkeypatch):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(5))
    code = dynamic_map(True)
    whole = quantize_blockwise(x, code, 256)
    monkeypatch.setattr(dynamic8, "QUANTIZE_CHUNK_ELEMENTS", 700)  # 2 blocks a piece, a short last one
    assert dynamic8.chunk_step(256) == 512
    pieces = quantize_blockwise(x, code, 256)
    assert torch.equal(whole[0], pieces[0]) and torch.equal(whole[1], pieces[1])


# --- 4-bit and 8-bit weights against bitsandbytes ---------------------------------------------------


def test_nf4_table_is_the_normal_quantiles_of_qlora():
    # QLoRA: 8 quantiles of N(0, 1) from 1-delta to 1/2 on the positive side, 7 on the negative,
    # delta = (1/30 + 1/32) / 2, and zero; all divided by the largest.
    top = 1 - (1 / 30 + 1 / 32) / 2
    assert abs(top - 0.9677083) < 1e-7
    steps = torch.linspace(0.9677083, 0.5, 9, dtype=torch.float32)
    positive = torch.special.ndtri(steps[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float32)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    derived = values / values.max()
    ours = fourbit.code_book("nf4")
    assert torch.allclose(ours, derived, rtol=0, atol=2e-7)
    assert torch.equal(ours, bnb.get_4bit_type("nf4", device="cpu"))


def test_fp4_table_is_bitsandbytes():
    assert torch.equal(fourbit.code_book("fp4"), bnb.get_4bit_type("fp4", device="cpu"))


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (33, 70), (5, 7), (96, 4097)])
def test_4bit_codes_scales_and_values_equal_bitsandbytes(kind, dtype, shape):
    # Sizes that are no multiple of 64 (a short last block) and odd ones (a half-used last byte)
    # are stored as bitsandbytes stores them, not refused.
    w = weight(shape, dtype, seed=shape[1])
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type=kind)
    module = QuantizedLinear.from_weight(w, None, QuantSettings(4, kind))
    assert torch.equal(module.packed, packed.view(-1))
    assert torch.equal(module.absmax, state.absmax)
    assert torch.equal(module.dequantize(dtype), bnb_dequantized_4bit(packed, state))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    out_features=st.integers(1, 40),
    in_pairs=st.integers(1, 100),
    kind=st.sampled_from(["nf4", "fp4"]),
    scale=st.floats(1e-4, 10.0),
    seed=st.integers(0, 2**16),
)
def test_any_4bit_and_int8_shape_equals_bitsandbytes(out_features, in_pairs, kind, scale, seed):
    # Even widths: bnb's compiled CPU path (odd ones are the parametrized cases above).
    w = torch.randn(out_features, 2 * in_pairs, generator=torch.Generator().manual_seed(seed)) * scale
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type=kind)
    module = QuantizedLinear.from_weight(w, None, QuantSettings(4, kind))
    assert torch.equal(module.packed, packed.view(-1)) and torch.equal(module.absmax, state.absmax)
    assert torch.equal(module.dequantize(torch.float32), bnb_dequantized_4bit(packed, state))
    int8, absmax, _ = bnb.int8_vectorwise_quant(w)
    module = QuantizedLinear.from_weight(w, None, QuantSettings(8))
    assert torch.equal(module.int8, int8) and torch.equal(module.row_absmax, absmax)


@pytest.mark.parametrize("shape", [(256, 320), (33, 70)])
def test_double_quantized_scales_equal_bitsandbytes(shape):
    w = weight(shape, seed=7)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    module = QuantizedLinear.from_weight(w, None, QuantSettings(4, "nf4", double_quant=True))
    assert torch.equal(module.packed, packed.view(-1))
    assert torch.equal(module.absmax_offset, state.offset)
    assert torch.equal(module.absmax_scales, state.state2.absmax)
    single = QuantizedLinear.from_weight(w, None, QuantSettings(4, "nf4"))
    centred = single.absmax - state.offset
    assert torch.equal(module.absmax_codes, bnb_nearest_blockwise(centred, dynamic_map(True), 256)[0])
    assert_nearer_or_equal(module.absmax_codes, state.absmax, centred, state.state2.absmax, 256)
    state.absmax = module.absmax_codes.clone()  # bnb's reading of our codes
    assert torch.equal(module.dequantize(torch.float32), bnb_dequantized_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_rows_equal_bitsandbytes(dtype):
    w = weight((48, 70), dtype, seed=8)
    int8, absmax, _ = bnb.int8_vectorwise_quant(w)
    module = QuantizedLinear.from_weight(w, None, QuantSettings(8))
    assert torch.equal(module.int8, int8) and torch.equal(module.row_absmax, absmax)
    assert torch.equal(module.dequantize(dtype), bnb.int8_vectorwise_dequant(int8, absmax).to(dtype))


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_zero_rows_read_back_as_zeros(settings):
    w = weight((8, 64))
    w[2:4] = 0
    back = QuantizedLinear.from_weight(w, None, settings).dequantize(torch.float32)
    assert torch.equal(back[2:4], torch.zeros(2, 64))
    assert (back[4:] - w[4:]).abs().max() < 0.1 * w.abs().max()


def test_error_of_each_format_is_as_small_as_its_bits_allow():
    w = weight((128, 256), seed=9)
    error = {
        name: (QuantizedLinear.from_weight(w, None, s).dequantize(torch.float32) - w).abs().mean() / w.abs().mean()
        for name, s in zip(IDS, SETTINGS)
    }
    assert error["int8"] < 0.01 < error["nf4"] < error["fp4"] < 0.2
    assert abs(error["nf4-double"] - error["nf4"]) < 0.01


# --- QuantizedLinear -----------------------------------------------------------------------------------


def test_settings_refuse_other_bits_and_kinds():
    with pytest.raises(ChipspanError, match=r"^--quantization_bit must be 4 or 8, not 2$"):
        QuantSettings(2)
    with pytest.raises(ChipspanError, match=r"^--quantization_type must be nf4 or fp4, not 'int4'$"):
        QuantSettings(4, "int4")
    assert QuantSettings(8, "fp4", True).bits == 8  # as in LLaMA-Factory: type and double quant are 4-bit's


def test_only_a_2d_float_weight_is_quantized():
    with pytest.raises(ChipspanError, match="only a 2-D floating-point weight can be quantized, not a 1-D"):
        QuantizedLinear.from_weight(torch.randn(64), None, QuantSettings())
    with pytest.raises(ChipspanError, match="not a 2-D torch.int64 one"):
        QuantizedLinear.from_weight(torch.ones(4, 64, dtype=torch.long), None, QuantSettings())


def reference(module, x, bias):
    """Dequantize-then-F.linear, the naive way, for comparison."""
    return F.linear(x, module.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


@pytest.fixture
def small_chunks(monkeypatch):
    """Dequantize 256 weights at a time: 4 rows of 64; rows of 70 round up to whole blocks, 32."""
    monkeypatch.setattr(linear, "DEQUANT_CHUNK_ELEMENTS", 4 * 64)
    assert chunk_rows(64) == 4 and chunk_rows(70) == 32  # 32 * 70 = 35 * 64


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("out_features", "in_features"), [(20, 64), (80, 70)])  # 5 and 3 chunks
def test_forward_and_backward_equal_dequantize_then_linear(
    small_chunks, settings, dtype, with_bias, out_features, in_features
):
    w = weight((out_features, in_features), seed=10)
    bias = torch.randn(out_features) if with_bias else None
    module = QuantizedLinear.from_weight(w.to(dtype), bias, settings)
    if with_bias:
        module.bias.requires_grad_(True)
    x = torch.randn(2, 3, in_features, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = None if bias is None else bias.clone().requires_grad_(True)
    out, want = module(x), reference(module, x_ref, bias_ref)
    assert out.shape == (2, 3, out_features) and out.dtype == dtype
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, want, **tolerance)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, **tolerance)
    if with_bias:
        torch.testing.assert_close(module.bias.grad, bias_ref.grad, **tolerance)


@pytest.mark.parametrize("settings", SETTINGS[2:], ids=IDS[2:])
def test_under_autocast_computes_as_linear_does(settings):
    module = QuantizedLinear.from_weight(weight((24, 64)), torch.randn(24), settings)
    x = torch.randn(5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
        want = F.linear(x_ref, module.dequantize(torch.float32), module.bias)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out.float().sum().backward()
    want.float().sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-2, atol=1e-2)


def test_frozen_bias_and_no_weight_get_no_gradient():
    module = QuantizedLinear.from_weight(weight((16, 64)), torch.randn(16), QuantSettings())
    assert not hasattr(module, "weight") and not module.bias.requires_grad
    assert [name for name, _ in module.named_parameters()] == ["bias"]
    x = torch.randn(3, 64, requires_grad=True)
    module(x).sum().backward()
    assert x.grad is not None and module.bias.grad is None


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_backward_keeps_only_the_quantized_weight(settings):
    out_features, in_features = 96, 128
    module = QuantizedLinear.from_weight(weight((out_features, in_features)), None, settings)
    x = torch.randn(4, 8, in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = module(x)
    assert not any(t.is_floating_point() and t.numel() >= out_features * in_features for t in saved)
    assert not any(t.shape == x.shape for t in saved)  # the input gradient needs only the weight
    assert sum(t.numel() * t.element_size() for t in saved) == module.quantized_bytes()
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
@pytest.mark.parametrize("shape", [(4096, 4096), (33, 70)])
def test_quantized_bytes_from_shapes_alone(settings, shape):
    module = QuantizedLinear.from_weight(weight(shape, torch.bfloat16), None, settings)
    assert module.quantized_bytes() == quantized_bytes_of(*shape, settings)
    if shape == (4096, 4096):
        per_weight = module.quantized_bytes() / (shape[0] * shape[1])
        want = {"nf4": 0.5 + 4 / 64, "fp4": 0.5 + 4 / 64, "nf4-double": 0.5 + 1 / 64, "int8": 1}
        assert per_weight == pytest.approx(want[IDS[SETTINGS.index(settings)]], abs=0.001)


def test_state_dict_lists_only_the_bias_and_to_keeps_the_scales_exact():
    module = QuantizedLinear.from_weight(weight((16, 64)), torch.randn(16), QuantSettings(4, "nf4", True))
    assert list(module.state_dict()) == ["bias"]
    before = module.dequantize(torch.float32)
    module.to(torch.bfloat16)
    assert module.bias.dtype == torch.bfloat16
    assert module.absmax_scales.dtype == module.code.dtype == torch.float32
    assert torch.equal(module.dequantize(torch.float32), before)


# --- meta, FakeTensorMode, emulated chips ----------------------------------------------------------------


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_meta_and_fake_tensors_trace_a_step(settings):
    shapes = {}
    module = QuantizedLinear.from_weight(torch.empty(48, 64, device="meta"), None, settings)
    x = torch.empty(2, 5, 64, device="meta", requires_grad=True)
    module(x).sum().backward()
    shapes["meta"] = (x.grad.shape, module.quantized_bytes())
    with FakeTensorMode():
        module = QuantizedLinear.from_weight(torch.randn(48, 64, dtype=torch.bfloat16), torch.zeros(48), settings)
        module.bias.requires_grad_(True)
        x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
        out = module(x)
        out.sum().backward()
        assert out.shape == (2, 5, 48) and out.dtype == torch.bfloat16
        assert module.bias.grad.shape == (48,)
        shapes["fake"] = (x.grad.shape, module.quantized_bytes())
    assert shapes["meta"] == shapes["fake"] == ((2, 5, 64), quantized_bytes_of(48, 64, settings))


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_on_an_emulated_chip_equals_cpu(chips, settings):
    w = weight((40, 64), torch.bfloat16, seed=11)
    on_cpu = QuantizedLinear.from_weight(w, None, settings)
    on_chip = QuantizedLinear.from_weight(w.to("emu:1"), None, settings)
    assert all(t.device == torch.device("emu:1") for t in on_chip.buffers())
    assert all(torch.equal(a.cpu(), b) for a, b in zip(on_chip.buffers(), on_cpu.buffers()))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    x_chip = x.to("emu:1").requires_grad_(True)
    out = on_chip(x_chip)
    torch.testing.assert_close(out.cpu(), on_cpu(x), rtol=0, atol=0)
    out.sum().backward()
    assert x_chip.grad.device == torch.device("emu:1")
    moved = on_cpu.to("emu:0")
    assert all(t.device == torch.device("emu:0") for t in moved.buffers())
    torch.testing.assert_close(moved(x.to("emu:0")).cpu(), out.detach().cpu(), rtol=0, atol=0)


def chip_bytes_during(step, chip="emu:0"):
    """(peak, kept): bytes the chip held at most during ``step()`` and still holds after it,
    beyond what it held before; and step's result."""
    emu.reset_peak_memory(chip)
    before = emu.memory_allocated(chip)
    result = step()
    return emu.peak_memory(chip) - before, emu.memory_allocated(chip) - before, result


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chip_memory_stays_within_the_stated_transients(chips, monkeypatch, settings, dtype):
    monkeypatch.setattr(linear, "DEQUANT_CHUNK_ELEMENTS", 1 << 14)  # 8 chunks of 32 rows
    monkeypatch.setattr(dynamic8, "QUANTIZE_CHUNK_ELEMENTS", 1 << 13)
    out_features, in_features, tokens = 256, 512, 24
    w = weight((out_features, in_features), dtype).to("emu:0")
    dequantized = out_features * in_features * dtype.itemsize
    peak, kept, module = chip_bytes_during(partial(QuantizedLinear.from_weight, w, None, settings))
    assert kept == module.quantized_bytes()
    assert peak - kept <= quantize_transient_bytes(out_features, in_features) < dequantized  # no fp32 copy
    del w  # the chip now holds only the quantized weight
    x = torch.randn(2, tokens // 2, in_features, dtype=dtype).to("emu:0").requires_grad_(True)
    output_bytes = tokens * out_features * dtype.itemsize
    bound = dequantize_chunk_bytes(in_features, dtype.itemsize, tokens)
    assert bound < dequantized / 2
    peak, kept, out = chip_bytes_during(lambda: module(x))
    assert kept == output_bytes  # nothing kept for backward beyond the quantized weight
    assert peak - output_bytes <= bound
    grad = torch.ones_like(out)
    peak, kept, _ = chip_bytes_during(lambda: out.backward(grad))
    assert peak - x.numel() * x.element_size() <= bound

    naive = x.detach().requires_grad_(True)
    _, kept, _ = chip_bytes_during(lambda: F.linear(naive, module.dequantize(dtype)))
    assert kept >= output_bytes + dequantized  # what dequantize-then-linear keeps for backward
