"""Optimizers beside torch's AdamW, and the bytes each keeps (which the memory plan reads).

``adamw``: AdamW with 8-bit block-wise moments and stochastic rounding of 16-bit weights, on any
device. ``offload``: AdamW with fp32 master weights and moments in host memory, stepped there.
"""
