"""Our decoder against transformers' on random tiny models of every supported variant."""

import pytest
import torch
from helpers import VARIANTS, batch, make_reference

from chipspan.models.decoder import KVCache
from chipspan.models.weights import load_pretrained


def relative_error(ours, ref):
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_loss_and_gradients_match_transformers(tmp_path, variant):
    ref, folder = make_reference(tmp_path, variant)
    ours = load_pretrained(folder)
    ids, labels = batch(ref.config.vocab_size)

    ref_out = ref(input_ids=ids, labels=labels)
    our_out = ours(ids, labels=labels)
    assert torch.allclose(our_out.logits, ref_out.logits, atol=1e-5, rtol=0)
    assert abs(our_out.loss.item() - ref_out.loss.item()) <= 1e-4 * abs(ref_out.loss.item())

    ref_out.loss.backward()
    our_out.loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        assert relative_error(param.grad, ref_grads[name].grad) < 1e-4, name


def test_right_padded_batch_matches_transformers_on_real_tokens(tmp_path):
    ref, folder = make_reference(tmp_path, "llama3-gqa-rope-llama3")
    ours = load_pretrained(folder)
    ids, _ = batch(ref.config.vocab_size, s=16)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    ref_logits = ref(input_ids=ids, attention_mask=mask).logits
    our_logits = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(our_logits[real], ref_logits[real], atol=1e-5, rtol=0)
    assert torch.isfinite(our_logits).all()


def test_kv_cache_steps_match_a_full_forward(tmp_path):
    _, folder = make_reference(tmp_path, "smollm-tied")
    ours = load_pretrained(folder)
    ids, _ = batch(ours.config.vocab_size, b=1, s=12)
    full = ours(ids).logits
    cache = KVCache()
    prefix = ours(ids[:, :9], cache=cache).logits
    step = ours(ids[:, 9:], cache=cache).logits  # three new tokens over a 9-token cache
    assert torch.allclose(torch.cat([prefix, step], dim=1), full, atol=1e-5, rtol=0)


def test_gradient_checkpointing_keeps_gradients(tmp_path):
    _, folder = make_reference(tmp_path, "llama2-mha")
    plain, recomputed = load_pretrained(folder), load_pretrained(folder)
    recomputed.gradient_checkpointing = True
    ids, labels = batch(plain.config.vocab_size)
    for model in (plain, recomputed):
        model.train()
        model(ids, labels=labels).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_model_slices_chain_to_the_whole_model(tmp_path):
    """Stages holding embed+layer 0, layer 1, layer 2+head give the whole model's loss."""
    _, folder = make_reference(tmp_path, "qwen2-qkv-bias")
    whole = load_pretrained(folder)
    stages = [
        load_pretrained(folder, layers=[0], head=False),
        load_pretrained(folder, layers=[1], embed=False, head=False),
        load_pretrained(folder, layers=[2], embed=False),
    ]
    assert [s.layer_indices for s in stages] == [[0], [1], [2]]
    ids, labels = batch(whole.config.vocab_size)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    hidden = stages[0].embed(ids)
    for stage in stages:
        hidden = stage.run_layers(hidden, positions)
    assert torch.allclose(stages[-1].loss(hidden, labels), whole(ids, labels=labels).loss, atol=1e-6)
    # the tied head of the last stage was read from the embedding matrix
    assert torch.equal(stages[-1].lm_head.weight, whole.model.embed_tokens.weight)
