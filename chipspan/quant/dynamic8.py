"""The 8-bit dynamic code and block-wise quantization with a code book.

The dynamic code (Dettmers, "8-Bit Approximations for Parallelism in Deep Learning") spends
its bits on a decimal exponent and a linear fraction, so it resolves values from 1e-6 to 1
relative to the block's absolute maximum. The table is bitsandbytes' ``create_dynamic_map``
value for value, so states and scales quantized here read back there and the other way round.

Block-wise quantization divides the flattened tensor into blocks of ``block`` elements (the
last one may be shorter), scales each by its absolute maximum and stores the index of the
nearest code value. The work goes a bounded number of elements at a time, so quantizing a
large tensor on a chip needs only a small transient beside it.
"""

import math

import torch

# At most this many elements are normalized and matched at once (a transient of ~24 bytes each).
QUANTIZE_CHUNK_ELEMENTS = 1 << 20

_EXPONENTS = 7  # decimal exponents 10^-6 .. 10^0


def _dynamic_values(signed: bool) -> tuple[float, ...]:
    """The 256 values of the dynamic code, ascending, within [-1, 1] (fp32 values as floats).

    For exponent i = 0..6 the fraction range [0.1, 1] is cut into 2^i equal pieces (2^(i+1)
    unsigned) and each piece's midpoint, times 10^(i-6), is a value (and its negative, when
    signed); 0 and 1 complete the table.
    """
    values = [0.0, 1.0]
    for i in range(_EXPONENTS):
        pieces = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, pieces + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - _EXPONENTS + 1)
        values += midpoints.tolist()
        if signed:
            values += (-midpoints).tolist()
    return tuple(sorted(values))


# Made at import, so that a table is also at hand under FakeTensorMode (which cannot read values).
_DYNAMIC = {signed: _dynamic_values(signed) for signed in (True, False)}


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The dynamic code, fp32 (256,) ascending: bitsandbytes' ``create_dynamic_map(signed)``."""
    return torch.tensor(_DYNAMIC[signed], dtype=torch.float32)


def nearest_code(normalized: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8, normalized's shape) of the value of ``code`` (ascending) nearest each element.

    A value exactly halfway between two code values takes the lower one.
    """
    boundaries = (code[:-1] + code[1:]) / 2
    return torch.bucketize(normalized, boundaries.to(normalized.device), out_int32=True).to(torch.uint8)


def block_absmax(flat: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 (ceil(n/block),): the largest |value| of each block of the 1-D tensor ``flat``."""
    full = flat.numel() - flat.numel() % block
    absmax = flat[:full].float().abs().view(-1, block).amax(dim=1)
    if full < flat.numel():
        absmax = torch.cat([absmax, flat[full:].float().abs().amax().view(1)])
    return absmax


def normalize_blocks(flat: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 (n,): each element of the 1-D ``flat`` times 1/absmax of its block (about [-1, 1]).

    Multiplying by the reciprocal is bitsandbytes' arithmetic; an all-zero block gives zeros.
    """
    n = flat.numel()
    padded = torch.nn.functional.pad(flat.float(), (0, -n % block)).view(-1, block)
    inverse = 1.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny)
    return (padded * inverse[:, None]).view(-1)[:n]


def chunk_step(block: int) -> int:
    """Elements quantized at once: whole blocks, about QUANTIZE_CHUNK_ELEMENTS of them."""
    return max(block, QUANTIZE_CHUNK_ELEMENTS // block * block)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any shape, float) with ``code`` (256 ascending values) in blocks of ``block``.

    Returns (codes uint8 (n,), absmax fp32 (ceil(n/block),)), both on x's device; n = x.numel().
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(math.ceil(n / block), dtype=torch.float32, device=x.device)
    code = code.to(x.device)
    step = chunk_step(block)
    for start in range(0, n, step):
        piece = flat[start : start + step]
        scales = block_absmax(piece, block)
        codes[start : start + piece.numel()] = nearest_code(normalize_blocks(piece, scales, block), code)
        absmax[start // block : start // block + scales.numel()] = scales
    return codes, absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    block: int,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The tensor of ``shape`` and ``dtype`` that ``quantize_blockwise`` turned into (codes, absmax).

    Each value is code[index] * absmax of its block, computed in fp32 and then cast.
    """
    n = codes.numel()
    values = code.to(codes.device).index_select(0, codes.reshape(-1).int())  # int32 indices: any chip takes them
    padded = torch.nn.functional.pad(values, (0, -n % block)).view(-1, block)
    return (padded * absmax[:, None]).view(-1)[:n].to(dtype).view(shape)
