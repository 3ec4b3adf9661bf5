"""Quantized frozen weights for LoRA, in pure PyTorch, in bitsandbytes' formats.

``dynamic8``: the 8-bit dynamic code and block-wise quantization with it (8-bit optimizer
states, double-quantized scales).
"""
