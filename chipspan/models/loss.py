"""Causal-LM cross-entropy that never builds the whole (tokens, vocab) logits tensor.

Only positions whose next-token label is not -100 reach the head: prompt tokens masked out of the
loss cost no head matmul. The remaining positions go through the head in chunks; each chunk's
logits are turned into the loss and, right away, into the gradients of the hidden states and of
the head weight, then freed. Peak extra memory is one chunk of fp32 logits instead of
(batch · seq · vocab) of them, and the backward pass does no further head matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chipspan.devices import index_dtype

IGNORE_INDEX = -100
LOGITS_CHUNK_ELEMENTS = 1 << 25  # fp32 logits per chunk: 128 MiB


@dataclass(frozen=True)
class ScoredTokens:
    """The positions a loss scores and what they predict: ``positions`` (n,) flat indices into the
    b·s positions of a (b, s) batch, ``targets`` (n,) their next-token ids, ``count`` = n on the host.

    Found where the labels are (``scored_tokens``) and moved to the chip with ``to``, they let
    the loss run without the chip stopping to tell the host how many tokens it scores."""

    positions: torch.Tensor
    targets: torch.Tensor
    count: int

    def to(self, device: torch.device | str) -> ScoredTokens:
        """On ``device``, in its index dtype (int32 where it cannot hold int64)."""
        index = index_dtype(device)
        return ScoredTokens(self.positions.to(device, index), self.targets.to(device, index), self.count)


def scored_tokens(labels: torch.Tensor) -> ScoredTokens:
    """Position t of labels (b, s) is scored on predicting labels[:, t + 1] unless that is -100."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    targets = targets.flatten()
    positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return ScoredTokens(positions, targets[positions], positions.numel())


def causal_lm_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor | ScoredTokens,
    reduction: str = "mean",
    chunk_elements: int = LOGITS_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Next-token cross-entropy, fp32 scalar.

    Args:
        hidden: final-normed hidden states (b, s, h).
        head_weight: the LM head (vocab, h).
        labels: (b, s) token ids; position t is scored on predicting labels[:, t + 1]; -100 is ignored.
            Labels are scored on the host (a chip need hold no int64 for it), or given as their
            ``scored_tokens``; either way they reach hidden's device in its index dtype.
        reduction: "mean" over scored tokens, or "sum". With no scored token the loss is 0.
        chunk_elements: fp32 logits computed at once; sets the chunk's token count.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    scored = (labels if isinstance(labels, ScoredTokens) else scored_tokens(labels.cpu())).to(hidden.device)
    if scored.count == 0:
        return hidden.sum().float() * 0.0
    chunk_tokens = max(1, chunk_elements // head_weight.shape[0])
    picked = hidden.flatten(0, 1).index_select(0, scored.positions)
    total = _LinearCrossEntropy.apply(picked, head_weight, scored.targets, chunk_tokens)
    return total / scored.count if reduction == "mean" else total


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), with gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens):
        # hidden (n, h), weight (vocab, h), targets (n,) -> fp32 scalar
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens]
            t = targets[start : start + chunk_tokens]
            logits = (h @ weight.T).float()  # (chunk, vocab)
            log_normalizer = torch.logsumexp(logits, dim=-1)
            # each target's logit by its flat index (chunk·vocab < 2**31), in t's index dtype: index_select
            # and index_add take int32 where a chip holds no int64 (gather and advanced indexing do not)
            flat = torch.arange(t.shape[0], dtype=t.dtype, device=t.device) * logits.shape[1] + t
            total += (log_normalizer - logits.view(-1).index_select(0, flat)).sum()
            if need_hidden_grad or need_weight_grad:
                # d(sum CE)/d logits = softmax - one_hot(target)
                d_logits = logits.sub_(log_normalizer.unsqueeze(1)).exp_()
                d_logits.view(-1).index_add_(0, flat, torch.full_like(flat, -1, dtype=d_logits.dtype))
                d_logits = d_logits.to(weight.dtype)
                if need_hidden_grad:
                    grad_hidden[start : start + chunk_tokens] = d_logits @ weight
                if need_weight_grad:
                    grad_weight += (d_logits.T @ h).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None
