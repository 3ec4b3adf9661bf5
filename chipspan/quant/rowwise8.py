"""8-bit weights: symmetric int8 per output channel, as bitsandbytes' LLM.int8() stores them.

Row r keeps absmax_r = max |W[r, :]| (fp32) and W[r, c] ~ int8[r, c] * absmax_r / 127, the
int8 being round(W[r, c] * 127 / absmax_r), with no outlier columns held back.
"""

import torch

from . import dynamic8

_LEVELS = 127


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 (out, in), absmax fp32 (out,)) of a 2-D float ``weight``, on its device.

    An all-zero row stores zeros. Works dynamic8.QUANTIZE_CHUNK_ELEMENTS elements (whole rows) at
    a time, 8 bytes of transient each.
    """
    weight = weight.detach()
    int8 = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    absmax = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    rows = max(1, dynamic8.QUANTIZE_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    for first in range(0, weight.shape[0], rows):
        chunk = weight[first : first + rows]
        absmax[first : first + rows] = chunk.abs().amax(dim=1).float()
        per_level = _LEVELS / absmax[first : first + rows].clamp(min=torch.finfo(torch.float32).tiny)
        int8[first : first + rows] = torch.round(chunk * per_level[:, None])
    return int8, absmax


def dequantize_rows(int8: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows of ``int8`` (rows, in) with their ``absmax`` (rows,) as ``dtype``: int8 * absmax / 127
    (in fp32: the product, then times fp32 1/127, then cast). Transient: 4 bytes an element."""
    return int8.float().mul_(absmax[:, None]).mul_(1 / _LEVELS).to(dtype)
