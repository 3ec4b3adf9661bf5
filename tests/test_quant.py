"""Quantized weights (chipspan.quant) against bitsandbytes' CPU path, the test-only reference.

bitsandbytes is imported here only; chipspan never imports it.
"""

import bitsandbytes.functional as bnb
import pytest
import torch

from chipspan.quant import dynamic8
from chipspan.quant.dynamic8 import dequantize_blockwise, dynamic_map, quantize_blockwise


def bnb_nearest_blockwise(x, code, block):
    """bitsandbytes' exact-nearest block-wise quantizer: its CPU op's generic path (taken for fp64
    input; the values are x's fp32 ones), which scales by 1/absmax and picks the nearest code."""
    codes, absmax = torch.ops.bitsandbytes.quantize_blockwise(x.double(), code.clone(), block)
    return codes.reshape(-1), absmax


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


def test_blockwise_never_farther_than_bitsandbytes_binary_search():
    # bnb's compiled CPU quantizer finds the code by an approximate search: on about 0.15% of
    # values it stores a neighbour of the nearest code. Ours is the nearest, never farther.
    x = torch.randn(64 * 1024, generator=torch.Generator().manual_seed(3))
    code = dynamic_map(True)
    codes, absmax = quantize_blockwise(x, code, 256)
    theirs, state = bnb.quantize_blockwise(x, code=code.clone(), blocksize=256)
    assert torch.equal(absmax, state.absmax)
    normalized = x.view(-1, 256) / absmax[:, None]
    ours_off = (code[codes.long()].view(-1, 256) - normalized).abs()
    theirs_off = (code[theirs.long()].view(-1, 256) - normalized).abs()
    assert bool((ours_off <= theirs_off + 1e-7).all())
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
