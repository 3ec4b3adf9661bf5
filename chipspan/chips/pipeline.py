"""GPipe in one process: a batch cut into micro-batches that flow through the chips together.

The rows of a batch are cut into M micro-batches. Their forwards are issued in wavefront order —
at clock t, stage s runs micro-batch t - s — so once the pipe is full every chip has work queued.
On devices that execute asynchronously (CUDA and most accelerators) the chips then compute at the
same time; on the CPU, and on emu chips (whose ops finish before they return), the same order runs
one op after another: the same numbers, no overlap. One backward over the summed loss follows;
PyTorch's autograd runs one worker thread per non-CPU device, so the chips overlap there too.

The loss is the whole batch's: each micro-batch's summed token loss divided by the number of
trained tokens in the whole batch, not a mean of micro-batch means. Every micro-batch's
activations live until the backward, so a chip holds all M of them (the memory plan's
``micro_batches_in_flight``).
"""

from __future__ import annotations

import torch

from chipspan.chips.span import SpannedModel
from chipspan.models.loss import IGNORE_INDEX


def pipelined_loss(model: SpannedModel, batch: dict[str, torch.Tensor], micro_batches: int) -> torch.Tensor:
    """Mean next-token loss of ``batch`` (fp32 scalar on the last chip, ready for ``.backward()``),
    equal to ``model(input_ids, labels, attention_mask)`` on the whole batch.

    ``batch``: ``input_ids``, ``labels`` and optionally ``attention_mask``, each (b, s) on the host
    (the mask may hold packed segment ids). The b rows are cut into ``micro_batches`` micro-batches
    as even as can be (the first ones one row longer when b does not divide); a batch with fewer
    rows than ``micro_batches`` gets one micro-batch per row.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be at least 1, not {micro_batches}")
    labels = batch["labels"]
    count = min(micro_batches, labels.shape[0])
    # the tokens the mean runs over: position t predicts labels[:, t + 1] (see causal_lm_loss)
    trained_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    masks = batch.get("attention_mask")
    mask_parts = masks.tensor_split(count) if masks is not None else [None] * count
    last_chip = model.placement.devices[-1]
    # host-to-chip copies first: on an asynchronous device each one waits for the chip to be idle
    carried = [model.place_inputs(ids, mask) for ids, mask in zip(batch["input_ids"].tensor_split(count), mask_parts)]
    label_parts = [part.to(last_chip) for part in labels.tensor_split(count)]
    summed = _wavefront(model, carried, label_parts)
    return torch.stack(summed).sum() / max(trained_tokens, 1)


def _wavefront(model: SpannedModel, carried: list, labels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run every micro-batch through every stage, clock by clock; the summed token loss of each.

    ``carried[m]``: micro-batch m's (token ids, positions, mask) on the first chip, replaced by what
    each stage hands on. Within a clock the stages are issued first to last, so the last stage's
    loss (which reads its token count back to the host) waits with every other chip busy.
    """
    num_stages, num_micro = len(model.stages), len(carried)
    summed = []
    for clock in range(num_micro + num_stages - 1):
        for stage in range(max(0, clock - num_micro + 1), min(clock, num_stages - 1) + 1):
            micro = clock - stage
            carried[micro] = model.stage_forward(stage, *carried[micro])
            if stage == num_stages - 1:
                summed.append(model.loss(carried[micro][0], labels[micro], reduction="sum"))
                carried[micro] = None  # its activations live on in the autograd graph only
    return summed
