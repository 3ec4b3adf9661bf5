"""Gradients of a model spanned over stages, the same in one process and over many: tied
embeddings and the global clipping norm.

Tied embeddings spanned over several stages live twice — the embedding matrix on the first stage,
its copy as the head on the last. Both copies get the sum of their gradients before the optimizer
step, and the global norm counts the matrix once, so they stay equal and the update is the one a
single device makes. Where the stages live in several processes, ``reduce`` (an in-place sum over
the processes concerned) joins what each one holds; in one process there is nothing to join.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from chipspan.models.decoder import CausalLM

Reduce = Callable[[torch.Tensor], None]  # an in-place sum over processes (dist.all_reduce over a group)


def tied_copies(stages: list[CausalLM], num_stages: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(embedding copies, head copies) of a trained embedding tied across stages, among ``stages``
    (some or all of the ``num_stages`` stages); both empty when untied or when one stage holds the model."""
    if num_stages == 1 or not stages[0].config.tie_word_embeddings:
        return [], []
    embeddings = [s.model.embed_tokens.weight for s in stages if s.model.embed_tokens is not None]
    heads = [s.lm_head.weight for s in stages if s.lm_head is not None]
    return [p for p in embeddings if p.requires_grad], [p for p in heads if p.requires_grad]


def trained_parameters(stages: list[CausalLM], leave_out: list[nn.Parameter]) -> list[nn.Parameter]:
    """Every trained parameter of ``stages`` once, in order, but those in ``leave_out``."""
    skip = {id(p) for p in leave_out}
    unique = {id(p): p for stage in stages for p in stage.parameters() if p.requires_grad and id(p) not in skip}
    return list(unique.values())


def sum_tied_gradients(copies: list[nn.Parameter], reduce: Reduce | None = None) -> None:
    """Give every copy of the tied matrix the sum of all copies' gradients (``reduce``: with the
    copies other processes hold)."""
    if not copies:
        return
    first, others = copies[0], copies[1:]
    total = first.grad if first.grad is not None else torch.zeros_like(first)  # summed in place: no third copy
    for p in others:
        if p.grad is not None:
            total.add_(p.grad.to(total.device))
    if reduce is not None:
        reduce(total)
    first.grad = total
    for p in others:
        p.grad = total.to(p.device, copy=True)


def clip_global_norm(
    counted: list[nn.Parameter],
    max_norm: float,
    device: torch.device,
    also_scaled: list[nn.Parameter] = (),
    reduce: Reduce | None = None,
) -> float:
    """Scale gradients in place so the global L2 norm is at most ``max_norm`` (0: only measure);
    returns the norm before scaling.

    The norm is over the gradients of ``counted`` (and, through ``reduce``, those other processes
    count); ``also_scaled`` are scaled too but counted elsewhere (the head copy of a tied embedding).
    It does not depend on how the parameters are spread over chips: one fp32 norm per parameter, on
    its own chip, gathered in parameter order on ``device``, their squares summed there. (Summing per
    device first, as ``torch.nn.utils.clip_grad_norm_`` does, rounds differently for each placement.)
    """
    grads = [p.grad for p in counted if p.grad is not None]
    total = global_norm([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads], device, reduce)
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads + [p.grad for p in also_scaled if p.grad is not None]:
            g.mul_(scale.to(g.device, g.dtype))
    return float(total)


def global_norm(norms: list[torch.Tensor], device: torch.device, reduce: Reduce | None = None) -> torch.Tensor:
    """The L2 norm of gradients whose own fp32 norms are ``norms`` (0-dim, in parameter order, on any
    chips): gathered on ``device``, their squares summed there (``reduce``: with other processes')."""
    gathered = [norm.to(device) for norm in norms]
    squares = torch.stack(gathered).square().sum() if gathered else torch.zeros((), device=device)
    if reduce is not None:
        reduce(squares)
    return squares.sqrt()
