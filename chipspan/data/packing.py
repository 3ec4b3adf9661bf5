"""SFT packing: several examples in one sequence of at most ``cutoff_len`` tokens, kept apart.

Each packed example remembers which tokens came from which example (``segment_ids`` 1, 2, 3, …).
``collate`` puts those ids in ``attention_mask``, from which the decoder builds block-diagonal
causal attention and positions that restart at 0 for each example. The first label of every
example is set to -100: no token is trained to predict the start of the next example, so the
summed loss of a packed sequence equals that of its examples run one by one.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from chipspan.data.encode import IGNORE_INDEX, Example


@dataclass
class PackedExample(Example):
    """Examples laid end to end; ``segment_ids`` (one per token) numbers them 1, 2, 3, …"""

    segment_ids: list[int]


def pack_examples(examples: list[Example], cutoff_len: int) -> list[PackedExample]:
    """Best-fit decreasing bin packing of ``examples`` into blocks of at most ``cutoff_len`` tokens.

    Longest examples are placed first, each into the fullest block that still has room (ties: the
    earlier block), else into a new block. The result depends only on the input. Empty examples
    are dropped; one longer than ``cutoff_len`` is an error.
    """
    order = sorted((i for i, e in enumerate(examples) if e.input_ids), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        length = len(examples[i].input_ids)
        if length > cutoff_len:
            raise ValueError(f"an example of {length} tokens cannot be packed into blocks of {cutoff_len}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, b = free.pop(slot)
        else:
            room, b = cutoff_len, len(bins)
            bins.append([])
        bins[b].append(i)
        if room > length:
            bisect.insort(free, (room - length, b))
    return [_concatenate([examples[i] for i in members]) for members in bins]


def _concatenate(examples: list[Example]) -> PackedExample:
    input_ids, labels, segment_ids = [], [], []
    for segment, example in enumerate(examples, start=1):
        input_ids += example.input_ids
        labels += [IGNORE_INDEX] + example.labels[1:]  # never a target: nothing before it in its example
        segment_ids += [segment] * len(example.input_ids)
    return PackedExample(input_ids, labels, segment_ids)


def packing_summary(num_examples: int, blocks: list[PackedExample], cutoff_len: int) -> str:
    """One line: how many examples went into how many blocks, and how full the blocks are."""
    tokens = sum(len(b.input_ids) for b in blocks)
    fill = 100 * tokens / (len(blocks) * cutoff_len) if blocks else 0.0
    return f"packed {num_examples} examples into {len(blocks)} blocks of ≤ {cutoff_len} tokens (fill {fill:.1f}%)"
