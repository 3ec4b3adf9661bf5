"""Our decoder against transformers' on random tiny models of every supported variant."""

import pytest
import torch
import transformers

from chipspan.models.decoder import KVCache
from chipspan.models.weights import load_pretrained

TINY = dict(
    vocab_size=131,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)

VARIANTS = {
    "llama2-mha": ("LlamaConfig", {}),
    "llama3-gqa-rope-llama3": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "llama-rope-linear": (
        "LlamaConfig",
        dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0)),
    ),
    "llama-rope-dynamic-beyond-max": (
        "LlamaConfig",
        dict(max_position_embeddings=16, rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0)),
    ),
    "llama-attention-bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    "llama-head-dim-given": ("LlamaConfig", dict(head_dim=24, num_key_value_heads=2)),
    "smollm-tied": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=4096)),
    "qwen2-qkv-bias": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def make_reference(tmp_path, variant, seed=0, **changes):
    """A random transformers model of ``variant`` (config ``changes`` applied), saved to tmp_path.

    Returns (model, folder)."""
    class_name, overrides = VARIANTS[variant]
    config = getattr(transformers, class_name)(**{**TINY, **overrides, **changes})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # biases start at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def batch(vocab, b=2, s=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt that is not trained on
    return ids, labels


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
