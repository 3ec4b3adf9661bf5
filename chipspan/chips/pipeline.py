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
from chipspan.models.loss import ScoredTokens, scored_tokens


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
    masks = batch.get("attention_mask")
    mask_parts = masks.tensor_split(count) if masks is not None else [None] * count
    last_chip = model.placement.devices[-1]
    # the scored tokens are found on the host, so no chip stops to report them; host-to-chip
    # copies go first: on an asynchronous device each one waits for the chip to be idle
    scored = [scored_tokens(part) for part in labels.tensor_split(count)]
    carried = [model.place_inputs(ids, mask) for ids, mask in zip(batch["input_ids"].tensor_split(count), mask_parts)]
    scored = [part.to(last_chip) for part in scored]
    summed = _wavefront(model, carried, scored)
    return torch.stack(summed).sum() / max(sum(part.count for part in scored), 1)


def _wavefront(model: SpannedModel, carried: list, scored: list[ScoredTokens]) -> list[torch.Tensor]:
    """Run every micro-batch through every stage, clock by clock; the summed token loss of each.

    ``carried[m]``: micro-batch m's (token ids, positions, mask) on the first chip, replaced by what
    each stage hands on; ``scored[m]`` its scored tokens, on the last chip.
    """
    num_stages, num_micro = len(model.stages), len(carried)
    summed = []
    for clock in range(num_micro + num_stages - 1):
        for stage in range(max(0, clock - num_micro + 1), min(clock, num_stages - 1) + 1):
            micro = clock - stage
            carried[micro] = model.stage_forward(stage, *carried[micro])
            if stage == num_stages - 1:
                summed.append(model.loss(carried[micro][0], scored[micro], reduction="sum"))
                carried[micro] = None  # its activations live on in the autograd graph only
    return summed
