"""Gradients across processes: data-parallel sums, tied embeddings, the global norm.

The loss is already scaled by the trained tokens of the whole global batch, so the replicas' gradients
are *summed* (DDP would average them). Tied embeddings spanned over two stages live on two ranks;
their gradients are summed over that 2-rank group, as ``SpannedModel.clip_gradients`` sums them in
one process. The clipping norm is the L2 norm over every unique trained parameter of every stage:
each rank's squared norms, summed over the pipeline group, the head copy of a tied matrix left out.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from chipspan.models.decoder import CausalLM


def data_parallel(module: nn.Module, group: dist.ProcessGroup, device: torch.device) -> nn.Module:
    """``module`` under DDP over ``group``, its gradients summed (not averaged) over the replicas."""
    wrapped = DistributedDataParallel(
        module, device_ids=[device] if device.type != "cpu" else None, process_group=group, broadcast_buffers=False
    )
    wrapped.register_comm_hook(group, _sum_gradients)
    return wrapped


def _sum_gradients(group, bucket):  # no annotations: DDP checks them, and here they would be strings
    """All-reduce (sum) one DDP gradient bucket over ``group``; a future of the summed flat tensor."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda done: done.value()[0])


def tied_copy(piece: CausalLM, num_stages: int) -> nn.Parameter | None:
    """This piece's copy of embeddings tied across stages (the embedding on the first stage, the head
    on the last), when it trains; None otherwise."""
    if not piece.config.tie_word_embeddings or num_stages == 1:
        return None
    copy = (
        piece.model.embed_tokens.weight
        if piece.model.embed_tokens is not None
        else (piece.lm_head.weight if piece.lm_head is not None else None)
    )
    return copy if copy is not None and copy.requires_grad else None


def sum_tied_gradients(copies: list[nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """Give every copy of the tied matrix the sum of their gradients: locally, then over ``group``."""
    if not copies:
        return
    total = sum(p.grad if p.grad is not None else torch.zeros_like(p) for p in copies)
    if group is not None:
        dist.all_reduce(total, group=group)
    for p in copies:
        p.grad = total if len(copies) == 1 else total.clone()


def clip_global_norm(
    parameters: list[nn.Parameter],
    copies: list[nn.Parameter],
    max_norm: float,
    group: dist.ProcessGroup,
    device: torch.device,
) -> float:
    """Scale gradients so the L2 norm over ``parameters`` of every rank in ``group`` is at most
    ``max_norm`` (0: only measure); returns the norm before scaling.

    ``parameters``: this rank's unique trained parameters; ``copies``: trained parameters whose
    gradient is scaled too but counted elsewhere (the head copy of a tied embedding)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        squares += torch.linalg.vector_norm(g, dtype=torch.float32).to(device) ** 2
    dist.all_reduce(squares, group=group)
    total = squares.sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads + [p.grad for p in copies if p.grad is not None]:
            g.mul_(scale.to(g.device, g.dtype))
    return float(total)
