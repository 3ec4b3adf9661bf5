"""The real SmolLM2-135M-Instruct, converted by `chipspan convert`, against transformers."""

import subprocess
import sys

import pytest
import torch
import transformers

from chipspan.infer.generate import SamplingSettings, generate
from chipspan.models.tokenizer import Tokenizer
from chipspan.models.weights import load_pretrained

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def models(smollm2_dir):
    ours = load_pretrained(smollm2_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return ours, theirs, Tokenizer.from_folder(smollm2_dir)


@pytest.mark.multiprocess
def test_cli_convert_writes_a_folder_transformers_loads(smollm2_gguf, tmp_path):
    out = tmp_path / "smollm2"
    result = subprocess.run(
        [sys.executable, "-m", "chipspan", "convert", str(smollm2_gguf), str(out), "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert transformers.AutoConfig.from_pretrained(out).num_hidden_layers == 30
    assert Tokenizer.from_folder(out).chat_template


def test_logits_equal_transformers(models):
    ours, theirs, tokenizer = models
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        difference = (ours(ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    assert difference <= 1e-4


def test_greedy_answer_is_token_identical(models):
    ours, theirs, tokenizer = models
    prompt = tokenizer.encode(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True))
    answer = generate(ours, prompt, stop_ids=[tokenizer.eos_token_id], settings=SamplingSettings(max_new_tokens=24))
    expected = theirs.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id
    )[0, len(prompt) :].tolist()
    if expected[-1] == tokenizer.eos_token_id:
        expected = expected[:-1]
    assert answer == expected
    assert "Paris" in tokenizer.decode(answer)
