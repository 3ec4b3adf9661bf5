"""Encoded examples held compactly: flat int32 token ids and labels, and where each example starts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain

import numpy as np

from chipspan.data.encode import IGNORE_INDEX, Example


class EncodedExamples(Sequence):
    """A sequence of ``Example``s stored as flat ``input_ids``/``labels`` (int32) and ``offsets`` (int64,
    one more than there are examples): example ``i`` is ``[offsets[i], offsets[i + 1])``.

    Indexing builds the ``Example`` (lists of ints) on demand, so the whole set costs 8 bytes a token.
    """

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray):
        self.input_ids, self.labels, self.offsets = input_ids, labels, offsets

    @classmethod
    def build(cls, examples: Iterable[Example]) -> EncodedExamples:
        examples = list(examples)
        lengths = [len(e.input_ids) for e in examples]
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        ids = np.fromiter(chain.from_iterable(e.input_ids for e in examples), dtype=np.int32, count=total)
        labels = np.fromiter(chain.from_iterable(e.labels for e in examples), dtype=np.int32, count=total)
        return cls(ids, labels, offsets)

    @classmethod
    def concat(cls, parts: Sequence[EncodedExamples]) -> EncodedExamples:
        if not parts:
            return cls.build([])
        starts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, starts)])
        return cls(np.concatenate([p.input_ids for p in parts]), np.concatenate([p.labels for p in parts]), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        index %= len(self)
        start, stop = self.offsets[index], self.offsets[index + 1]
        return Example(self.input_ids[start:stop].tolist(), self.labels[start:stop].tolist())

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    def take(self, indices: Sequence[int] | np.ndarray) -> EncodedExamples:
        """The examples at ``indices``, in that order, as a new compact set."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        positions = np.repeat(self.offsets[indices] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return EncodedExamples(self.input_ids[positions], self.labels[positions], offsets)

    def trained(self) -> np.ndarray:
        """Whether each example has at least one token to train on: a label that is not -100 after its
        first position (the loss predicts token t + 1 from token t, so a first label is never a target)."""
        scored = self.labels != IGNORE_INDEX
        starts = self.offsets[:-1]
        scored[starts[starts < len(scored)]] = False
        trained = np.concatenate([[0], np.cumsum(scored)])
        return trained[self.offsets[1:]] > trained[self.offsets[:-1]]
