"""4-bit weights: NF4 and FP4 codes in blocks, two codes a byte, as bitsandbytes stores them.

A weight is flattened and cut into blocks of ``block`` elements (64 by default; the last block
may be shorter). Each block keeps its absolute maximum (fp32) and each element the 4-bit index
of the code value nearest element/absmax. Two indices share a byte, the earlier element in the
high nibble; an odd element count leaves the last low nibble at the code of zero.

Double quantization (QLoRA) stores the absmax values themselves in 8 bits: their mean is kept
as an fp32 offset and (absmax - offset) is quantized with the signed dynamic code in blocks of
256, which brings the scales from 0.5 to about 0.127 bits per weight.
"""

import math

import torch

from . import dynamic8

# NormalFloat4 (Dettmers et al., QLoRA, appendix E): the quantiles of N(0, 1) at 8 equal steps
# from 1-delta to 1/2 (positive side) and 7 steps (negative side), scaled to [-1, 1], with zero.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# bitsandbytes' FP4 by nibble, before dividing by the largest (12): a sign bit, then two exponent
# bits e and one mantissa bit m; e = 0 is subnormal (m * 0.0625), else (1 + m/2) * 2^(4-e).
# Nibble 8 ("-0") is +0 as in bitsandbytes.
FP4_UNSCALED = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

DOUBLE_QUANT_BLOCK = 256
KINDS = ("nf4", "fp4")


def code_book(kind: str) -> torch.Tensor:
    """fp32 (16,): the value each 4-bit index stands for, in units of the block's absmax."""
    if kind == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    return torch.tensor(FP4_UNSCALED, dtype=torch.float32) / 12


def _nearest_nibble(normalized: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 (normalized's shape): the 4-bit index whose value in ``code`` (16, on the host) is nearest each element.

    Of two equal values (FP4's +0 and -0) the lower index wins, as in bitsandbytes.
    """
    order = torch.argsort(code, stable=True)  # on the host, where int64 indices may live
    position = dynamic8.nearest_code(normalized, code[order])
    return order.to(normalized.device, torch.uint8).index_select(0, position.int())


def quantize_4bit(weight: torch.Tensor, kind: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` (any shape, float) to 4-bit ``kind`` codes in blocks of ``block`` (even).

    Returns (packed uint8 (ceil(n/2),), absmax fp32 (ceil(n/block),)) on weight's device.
    Works a bounded piece at a time (dynamic8.QUANTIZE_CHUNK_ELEMENTS).
    """
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    code = code_book(kind)  # on the host
    packed = torch.empty(math.ceil(n / 2), dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(math.ceil(n / block), dtype=torch.float32, device=weight.device)
    step = dynamic8.chunk_step(block)
    for start in range(0, n, step):
        piece = flat[start : start + step]
        scales = dynamic8.block_absmax(piece, block)
        normalized = dynamic8.normalize_blocks(piece, scales, block)
        nibbles = _nearest_nibble(torch.nn.functional.pad(normalized, (0, piece.numel() % 2)), code)
        packed[start // 2 : start // 2 + nibbles.numel() // 2] = (nibbles[0::2] << 4) | nibbles[1::2]
        absmax[start // block : start // block + scales.numel()] = scales
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    block: int,
    start: int,
    stop: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Elements start..stop-1 (``start`` a multiple of ``block``) of the flattened weight, ``dtype``.

    ``absmax`` holds the scales of blocks start/block onward (fp32); ``code`` is the (16,) book.
    Each value is code[index] * absmax in fp32, then cast. Transient: 6 bytes an element.
    """
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # (256, 2): byte -> 2 values
    values = pairs.index_select(0, packed[start // 2 : (stop + 1) // 2].int()).view(-1)[: stop - start]
    whole = (stop - start) // block * block
    values[:whole].view(-1, block).mul_(absmax[: whole // block, None])
    if whole < values.numel():
        values[whole:].mul_(absmax[whole // block])
    return values.to(dtype)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 8-bit form of fp32 block scales: (codes uint8 (k,), scales fp32 (ceil(k/256),), offset fp32 ())."""
    offset = absmax.mean()
    codes, scales = dynamic8.quantize_blockwise(absmax - offset, dynamic8.dynamic_map(True), DOUBLE_QUANT_BLOCK)
    return codes, scales, offset


def undo_double_quant(
    codes: torch.Tensor,
    scales: torch.Tensor,
    offset: torch.Tensor,
    dynamic_code: torch.Tensor,
    first: int,
    stop: int,
) -> torch.Tensor:
    """fp32 (stop-first,): the block scales first..stop-1 that ``double_quantize`` stored."""
    # int32 indices through index_select: what a chip without int64 takes
    blocks = torch.arange(first, stop, dtype=torch.int32, device=codes.device) // DOUBLE_QUANT_BLOCK
    return dynamic_code.index_select(0, codes[first:stop].int()) * scales.index_select(0, blocks) + offset
