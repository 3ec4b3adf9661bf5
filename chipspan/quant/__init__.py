"""Quantized frozen weights for LoRA, in pure PyTorch, in bitsandbytes' formats.

``dynamic8``: the 8-bit dynamic code and block-wise quantization with it (8-bit optimizer
states, double-quantized scales). ``fourbit``: NF4/FP4 in blocks of 64. ``rowwise8``: int8 per
output channel. ``linear``: ``QuantizedLinear`` and the byte counts the memory plan uses.
"""

from .linear import (
    DEQUANT_CHUNK_ELEMENTS,
    QuantizedLinear,
    QuantSettings,
    chunk_rows,
    dequantize_chunk_bytes,
    quantize_transient_bytes,
    quantized_bytes_of,
    quantized_summary,
)

__all__ = [
    "DEQUANT_CHUNK_ELEMENTS",
    "QuantSettings",
    "QuantizedLinear",
    "chunk_rows",
    "dequantize_chunk_bytes",
    "quantize_transient_bytes",
    "quantized_bytes_of",
    "quantized_summary",
]
