"""A linear layer over a frozen quantized weight, for LoRA's base (QLoRA).

``QuantizedLinear.from_weight`` quantizes on the weight's own device (a chip, CUDA, the CPU,
``meta`` or under FakeTensorMode) and keeps no full-precision copy. Forward and backward
dequantize a few output rows at a time (``DEQUANT_CHUNK_ELEMENTS``), so beside the quantized
weight only one chunk of dequantized rows ever exists, and nothing of the weight but its
quantized form is kept for backward; the frozen weight gets no gradient.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from chipspan.errors import ChipspanError

from . import dynamic8, fourbit, rowwise8

BLOCK = 64  # elements a 4-bit block scale covers (QLoRA's and bitsandbytes' default)
DEQUANT_CHUNK_ELEMENTS = 1 << 22  # about this many weights are dequantized at once
QUANTIZE_TRANSIENT_PER_ELEMENT = 24  # bytes from_weight needs per weight it quantizes at once
_PAIR_TABLE_BYTES = 256 * 2 * 4  # fp32 values of both nibbles of each byte


@dataclass(frozen=True)
class QuantSettings:
    """How a frozen base weight is stored: ``bits`` 4 or 8; for 4 bits, the code ``kind``
    ("nf4" or "fp4") and whether the block scales are themselves quantized (``double_quant``).
    ``kind`` and ``double_quant`` have no effect with 8 bits (per-channel int8), as in LLaMA-Factory."""

    bits: int = 4
    kind: str = "nf4"
    double_quant: bool = False

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ChipspanError(f"--quantization_bit must be 4 or 8, not {self.bits}")
        if self.kind not in fourbit.KINDS:
            raise ChipspanError(f"--quantization_type must be nf4 or fp4, not {self.kind!r}")

    @property
    def block(self) -> int:
        return BLOCK


def chunk_rows(in_features: int) -> int:
    """Output rows dequantized at once: about DEQUANT_CHUNK_ELEMENTS weights, and a whole number
    of 4-bit blocks (rows * in_features a multiple of BLOCK)."""
    align = BLOCK // math.gcd(in_features, BLOCK)
    return max(align, DEQUANT_CHUNK_ELEMENTS // in_features // align * align)


def dequantize_chunk_bytes(in_features: int, dtype_bytes: int, tokens: int = 0, out_features: int | None = None) -> int:
    """Most bytes QuantizedLinear's forward or backward holds beyond its inputs and its output.

    Dequantizing one chunk of E = chunk_rows * in_features weights takes 6 bytes each at most
    (fp32 values beside their int32 byte index or their cast), plus the chunk's scales and a
    2 KiB table; then the chunk (E * dtype_bytes) and, in forward, its product with the input
    (``tokens`` = batch * sequence rows by chunk_rows) are alive together. The bound is what
    4-bit weights take on the emulated chips; int8 takes no more. ``out_features``: a weight with
    fewer rows than a chunk dequantizes only those.
    """
    rows = chunk_rows(in_features) if out_features is None else min(chunk_rows(in_features), out_features)
    weights = rows * in_features
    dequantizing = 6 * weights + 4 * math.ceil(weights / BLOCK) + _PAIR_TABLE_BYTES  # and the chunk's scales
    return max(dequantizing, (weights + tokens * rows) * dtype_bytes)


def quantize_transient_bytes(out_features: int, in_features: int) -> int:
    """Most bytes ``from_weight`` holds beyond the weight and the quantized tensors it returns:
    QUANTIZE_TRANSIENT_PER_ELEMENT for each weight quantized at once, and 8 for each 4-bit block
    (the fp32 scales before double quantization, and the same less their mean)."""
    n = out_features * in_features
    at_once = min(n, dynamic8.QUANTIZE_CHUNK_ELEMENTS + in_features)
    return QUANTIZE_TRANSIENT_PER_ELEMENT * at_once + 8 * math.ceil(n / BLOCK)


def quantized_bytes_of(out_features: int, in_features: int, settings: QuantSettings) -> int:
    """Bytes a QuantizedLinear's quantized tensors take (its bias not counted), from shapes alone."""
    n = out_features * in_features
    if settings.bits == 8:
        return n + 4 * out_features  # int8 weights and an fp32 absmax per row
    blocks = math.ceil(n / BLOCK)
    scales = 4 * blocks
    if settings.double_quant:
        second_level = math.ceil(blocks / fourbit.DOUBLE_QUANT_BLOCK)
        scales = blocks + 4 * second_level + 4 + 4 * 256  # codes, their scales, offset, dynamic code
    return math.ceil(n / 2) + scales + 4 * 16  # packed pairs, scales, code book


def quantize_weight(weight: torch.Tensor, settings: QuantSettings) -> dict[str, torch.Tensor]:
    """The tensors that store ``weight`` (out, in) under ``settings``, by buffer name, on its device."""
    if settings.bits == 8:
        int8, absmax = rowwise8.quantize_rows(weight)
        return {"int8": int8, "row_absmax": absmax}
    packed, absmax = fourbit.quantize_4bit(weight, settings.kind, BLOCK)
    tensors = {"packed": packed, "code": fourbit.code_book(settings.kind).to(weight.device)}
    if not settings.double_quant:
        return tensors | {"absmax": absmax}
    codes, scales, offset = fourbit.double_quantize(absmax)
    dynamic_code = dynamic8.dynamic_map(True).to(weight.device)
    return tensors | {
        "absmax_codes": codes,
        "absmax_scales": scales,
        "absmax_offset": offset,
        "dynamic_code": dynamic_code,
    }


def dequantize_rows(
    tensors: dict[str, torch.Tensor], settings: QuantSettings, in_features: int, first: int, stop: int, dtype
) -> torch.Tensor:
    """Rows first..stop-1 of the weight ``tensors`` store, (stop-first, in_features) ``dtype``.

    For 4 bits, first * in_features must be a multiple of BLOCK (chunk_rows keeps it so).
    """
    if settings.bits == 8:
        return rowwise8.dequantize_rows(tensors["int8"][first:stop], tensors["row_absmax"][first:stop], dtype)
    start, end = first * in_features, stop * in_features
    blocks = slice(start // BLOCK, math.ceil(end / BLOCK))
    if settings.double_quant:
        scales = fourbit.undo_double_quant(
            tensors["absmax_codes"],
            tensors["absmax_scales"],
            tensors["absmax_offset"],
            tensors["dynamic_code"],
            blocks.start,
            blocks.stop,
        )
    else:
        scales = tensors["absmax"][blocks]
    values = fourbit.dequantize_4bit(tensors["packed"], scales, tensors["code"], BLOCK, start, end, dtype)
    return values.view(stop - first, in_features)


def _row_chunks(out_features: int, in_features: int):
    """(first, stop) of each chunk of output rows, in order."""
    step = chunk_rows(in_features)
    return [(first, min(first + step, out_features)) for first in range(0, out_features, step)]


class _QuantizedMatmul(torch.autograd.Function):
    """x (..., in) @ W.T + bias, W dequantized chunk by chunk; saves only W's quantized tensors."""

    @staticmethod
    def forward(ctx, x, bias, layout, *stored):
        settings, out_features, in_features, names = layout
        tensors = dict(zip(names, stored))
        x2d = x.reshape(-1, in_features)
        out = x2d.new_empty(x2d.shape[0], out_features)
        ctx.bias_dtype = None if bias is None else bias.dtype
        bias = None if bias is None else bias.to(x.dtype)
        for first, stop in _row_chunks(out_features, in_features):  # one chunk alive at a time
            rows = dequantize_rows(tensors, settings, in_features, first, stop, x.dtype).t()
            out[:, first:stop] = x2d @ rows if bias is None else torch.addmm(bias[first:stop], x2d, rows)
            del rows
        ctx.layout = layout
        ctx.save_for_backward(*stored)
        return out.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out):
        settings, out_features, in_features, names = ctx.layout
        tensors = dict(zip(names, ctx.saved_tensors))
        grad2d = grad_out.reshape(-1, out_features)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad2d.new_zeros(grad2d.shape[0], in_features)
            for first, stop in _row_chunks(out_features, in_features):
                grad_x.addmm_(
                    grad2d[:, first:stop], dequantize_rows(tensors, settings, in_features, first, stop, grad2d.dtype)
                )
            grad_x = grad_x.view(*grad_out.shape[:-1], in_features)
        if ctx.needs_input_grad[1]:
            grad_bias = grad2d.sum(dim=0).to(ctx.bias_dtype)
        return (grad_x, grad_bias, None, *([None] * len(names)))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear computes x in: autocast's when it is on for x's device, else x's."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class QuantizedLinear(nn.Module):
    """``nn.Linear``'s forward over a frozen quantized weight (out, in); no ``weight`` attribute.

    The quantized tensors are non-persistent buffers: ``.to()`` moves them (keeping their dtypes)
    and ``state_dict()`` lists only ``bias``, a frozen Parameter or None.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        settings: QuantSettings,
        tensors: dict[str, torch.Tensor],
        bias: torch.Tensor | None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.settings = in_features, out_features, settings
        self._quantized_names = tuple(tensors)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, settings: QuantSettings):
        """Quantize ``weight`` (out, in) on its device; ``bias`` (out,) or None is kept as it is."""
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ChipspanError(
                f"only a 2-D floating-point weight can be quantized, not a {weight.dim()}-D {weight.dtype} one"
            )
        out_features, in_features = weight.shape
        return cls(in_features, out_features, settings, quantize_weight(weight, settings), bias)

    def stored(self) -> dict[str, torch.Tensor]:
        """The quantized tensors by name."""
        return {name: getattr(self, name) for name in self._quantized_names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype, or in autocast's where it is on (as nn.Linear)."""
        x = x.to(_compute_dtype(x))
        layout = (self.settings, self.out_features, self.in_features, self._quantized_names)
        return _QuantizedMatmul.apply(x, self.bias, layout, *self.stored().values())

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole weight (out, in) as ``dtype`` (for merging, export and checks)."""
        stored = self.stored()
        chunks = _row_chunks(self.out_features, self.in_features)
        return torch.cat([dequantize_rows(stored, self.settings, self.in_features, a, b, dtype) for a, b in chunks])

    def quantized_bytes(self) -> int:
        """Bytes the quantized tensors take (equals quantized_bytes_of for this shape and settings)."""
        return sum(t.numel() * t.element_size() for t in self.stored().values())

    def _apply(self, fn, recurse=True):
        # A dtype change (module.to(torch.bfloat16), .half()) must not touch the stored scales
        # and code books: they keep their dtype and only follow the device.
        before = self.stored()
        super()._apply(fn, recurse)
        for name, tensor in before.items():
            if self._buffers[name].dtype != tensor.dtype:
                self._buffers[name] = tensor.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {_kind(self.settings)}, bias={self.bias is not None}"


def _kind(settings: QuantSettings) -> str:
    if settings.bits == 8:
        return "int8"
    return settings.kind + (" double-quant" if settings.double_quant else "")


def quantized_summary(modules: list[nn.Module]) -> str | None:
    """One line on the quantized linears inside ``modules`` (a run's stages), or None if there are none."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        return None
    held = sum(layer.quantized_bytes() for layer in layers)
    weights = sum(layer.in_features * layer.out_features for layer in layers)
    return (
        f"frozen base: {len(layers)} linear weights ({weights:,} parameters) quantized to "
        f"{_kind(layers[0].settings)} as they loaded, {held / 2**20:.1f} MiB"
    )
