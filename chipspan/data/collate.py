"""Examples -> a padded batch of tensors, as LLaMA-Factory 0.5's ``DataCollatorForSeq2Seq`` made them."""

from __future__ import annotations

import torch

from chipspan.data.encode import IGNORE_INDEX, Example
from chipspan.data.packing import PackedExample


def collate(examples: list[Example], pad_id: int, pad_to_multiple_of: int | None = 8) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example, rounded up to a multiple of ``pad_to_multiple_of``.

    Returns int64 ``input_ids`` (padded with ``pad_id``), ``labels`` (padded with -100) and
    ``attention_mask``, each of shape (batch, length). ``attention_mask`` is 0 on padding and 1 on
    real tokens; for a ``PackedExample`` it holds its segment ids 1, 2, 3, … instead.
    """
    length = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        if isinstance(example, PackedExample):
            attention_mask[row, :n] = torch.tensor(example.segment_ids, dtype=torch.long)
        else:
            attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
