"""Generation with the KV cache against transformers' greedy decoding and a cache-free loop."""

import torch
from helpers import make_reference

from chipspan.infer.generate import SamplingSettings, generate
from chipspan.models.weights import load_pretrained


def test_greedy_generation_equals_transformers(tmp_path):
    ref, folder = make_reference(tmp_path, "llama3-gqa-rope-llama3")
    ours = load_pretrained(folder)
    prompt = [5, 17, 42, 8, 99]
    expected = ref.generate(
        torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert generate(ours, prompt, stop_ids=[], settings=SamplingSettings(max_new_tokens=20)) == expected


def test_stop_token_ends_generation(tmp_path):
    _, folder = make_reference(tmp_path, "smollm-tied")
    model = load_pretrained(folder)
    free = generate(model, [3, 4, 5], stop_ids=[], settings=SamplingSettings(max_new_tokens=6))
    assert len(free) == 6
    stopped = generate(model, [3, 4, 5], stop_ids=[free[2]], settings=SamplingSettings(max_new_tokens=6))
    assert stopped == free[: free.index(free[2])]


def test_sampling_is_reproducible_and_top_k_one_is_greedy(tmp_path):
    _, folder = make_reference(tmp_path, "smollm-tied")
    model = load_pretrained(folder)
    hot = SamplingSettings(max_new_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    first = generate(model, [1, 2, 3], [], hot)
    assert first == generate(model, [1, 2, 3], [], hot)
    greedy = generate(model, [1, 2, 3], [], SamplingSettings(max_new_tokens=12))
    top1 = SamplingSettings(max_new_tokens=12, temperature=1.0, top_k=1, seed=3)
    assert generate(model, [1, 2, 3], [], top1) == greedy
