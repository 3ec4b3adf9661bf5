"""The chunked causal-LM loss equals plain cross-entropy, without keeping the logits around."""

import pytest
import torch
import torch.nn.functional as F

from chipspan.models.loss import causal_lm_loss

VOCAB, HIDDEN = 97, 24


def inputs(b=3, s=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, HIDDEN, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    labels[0, :4] = -100
    labels[2, 6:] = -100
    return hidden, weight, labels


def plain_loss(hidden, weight, labels, reduction="mean"):
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100, reduction=reduction
    )


@pytest.mark.parametrize("chunk_tokens", [1, 5, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_value_and_gradients_equal_plain_cross_entropy(chunk_tokens, reduction):
    hidden, weight, labels = inputs()
    ours = causal_lm_loss(hidden, weight, labels, reduction=reduction, chunk_elements=chunk_tokens * VOCAB)
    (ours * 1.7).backward()  # a non-unit upstream gradient must scale both gradients
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = plain_loss(hidden, weight, labels, reduction)
    (ref * 1.7).backward()
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(got[0], hidden.grad, atol=1e-6)
    assert torch.allclose(got[1], weight.grad, atol=1e-6)


def test_frozen_head_gets_no_gradient():
    hidden, weight, labels = inputs()
    weight.requires_grad_(False)
    causal_lm_loss(hidden, weight, labels).backward()
    assert weight.grad is None and hidden.grad is not None


def test_no_scored_token_gives_zero_loss_and_zero_gradients():
    hidden, weight, _ = inputs()
    labels = torch.full((3, 11), -100)
    loss = causal_lm_loss(hidden, weight, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert not hidden.grad.any()


def test_bf16_weights_give_the_fp32_loss_of_bf16_logits():
    hidden, weight, labels = inputs(dtype=torch.bfloat16)
    ours = causal_lm_loss(hidden, weight, labels, chunk_elements=4 * VOCAB)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, plain_loss(hidden, weight, labels), rtol=1e-5)


def test_autograd_keeps_no_logits_sized_tensor():
    hidden, weight, labels = inputs(b=4, s=32)
    scored = int((labels[:, 1:] != -100).sum())
    saved_sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_sizes.append(t.numel()) or t, lambda t: t):
        loss = causal_lm_loss(hidden, weight, labels, chunk_elements=8 * VOCAB)
    loss.backward()
    assert max(saved_sizes) < scored * VOCAB / 2  # hidden-sized gradients, never (tokens, vocab) logits
