"""`chipspan export --export_format gguf`: the file reads back through `chipspan convert` to the same
model (bit for bit in f32/f16/bf16, within q8_0's rounding), its metadata reads in the `gguf`
package, the tokenizer survives, and what a GGUF cannot hold is refused before anything is written.

References: the transformers model that wrote the folder (its tensors, its config), the original
tokenizer.json, and q8_0's rounding bound computed by hand.
"""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from helpers import LLAMA2_TOKENIZER, make_reference

from chipspan.cli import main
from chipspan.models import gguf_export
from chipspan.models.gguf_import import convert_gguf
from chipspan.models.tokenizer import Tokenizer

SMALL = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
TEXTS = [
    "Hello world",
    "  leading spaces and\ttabs\n\nnew lines",
    "digits 1234567 and 3.14159",
    "中文字符和标点。",
    "emoji 😀🚀 mixed",
    "don't WE'LL they're",
]


def model_folder(tmp_path, variant="llama2-mha", tokenizer_dir=LLAMA2_TOKENIZER, **changes):
    """A random transformers model of ``variant`` with ``tokenizer_dir``'s tokenizer: (model, folder).
    llama3 rope scaling gets heads of 32 features: enough frequencies between its two thresholds for
    `chipspan convert` to recover the scaling from ``rope_freqs``."""
    if variant == "llama3-gqa-rope-llama3":
        changes = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, **changes)
    model, folder = make_reference(tmp_path / "model", variant, **{**SMALL, **changes})
    for file in tokenizer_dir.glob("*token*"):
        shutil.copy(file, folder)
    return model, folder


def export_gguf(folder, out, *flags):
    """Run `chipspan export` to GGUF; returns the .gguf file written."""
    assert main(["export", "--model_name_or_path", str(folder), "--export_dir", str(out), "--export_format", "gguf",
                 *map(str, flags)]) == 0  # fmt: skip
    (file,) = out.glob("*.gguf")
    return file


def round_trip(tmp_path, folder, quantization="f32", *flags):
    """(the .gguf file, the folder `chipspan convert` makes of it in float32)."""
    file = export_gguf(folder, tmp_path / "gguf", "--export_quantization", quantization, *flags)
    return file, convert_gguf(file, tmp_path / "back", dtype="float32")


def back_tensors(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize(
    "variant", ["llama2-mha", "llama3-gqa-rope-llama3", "llama-rope-linear", "llama-head-dim-given", "smollm-tied"]
)
def test_f32_reads_back_bit_for_bit_with_its_config(tmp_path, variant):
    model, folder = model_folder(tmp_path, variant)
    file, back = round_trip(tmp_path, folder)
    want = {
        k: v for k, v in model.state_dict().items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")
    }
    got = back_tensors(back)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
    ours, theirs = json.loads((back / "config.json").read_text()), json.loads((folder / "config.json").read_text())
    for key in ("num_key_value_heads", "num_attention_heads", "tie_word_embeddings", "rms_norm_eps", "vocab_size"):
        assert ours[key] == theirs[key], key
    assert ours["head_dim"] == model.config.head_dim
    scaling = theirs.get("rope_scaling") or theirs.get("rope_parameters")
    if scaling and scaling.get("rope_type") != "default":
        got_scaling = {k: v for k, v in ours["rope_scaling"].items()}
        want_scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type")}
        assert got_scaling == want_scaling
    assert ours["rope_theta"] == (theirs.get("rope_theta") or scaling["rope_theta"])


@pytest.mark.parametrize("quantization, dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_types_read_back_as_the_weights_cast(tmp_path, quantization, dtype):
    model, folder = model_folder(tmp_path, "llama3-gqa-rope-llama3")
    file, back = round_trip(tmp_path, folder, quantization)
    got = back_tensors(back)
    for key, tensor in model.state_dict().items():
        want = tensor.to(dtype).float() if tensor.dim() == 2 else tensor  # norms stay F32
        assert torch.equal(got[key], want), key
    reader = gguf.GGUFReader(file)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf_export.QUANTIZATIONS[quantization]
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["rope_freqs.weight"] == gguf.GGMLQuantizationType.F32


def test_q8_0_stays_within_its_rounding_and_really_quantizes(tmp_path):
    """q8_0 stores each block of 32 values as round(x / d) * fp16(d), d = max|x| / 127: a value is off
    by at most d/2 plus 127 * |d - fp16(d)| <= 127 * d * 2^-11."""
    model, folder = model_folder(tmp_path, "llama2-mha", hidden_size=64, intermediate_size=96)
    file, back = round_trip(tmp_path, folder, "q8_0")
    got = back_tensors(back)
    changed = 0
    for key, tensor in model.state_dict().items():
        if tensor.dim() == 1:
            assert torch.equal(got[key], tensor), key
            continue
        blocks, back_blocks = tensor.reshape(-1, 32).double(), got[key].reshape(-1, 32).double()
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        bound = d * (0.5 + 127 / 2048) * (1 + 1e-6) + 1e-30
        assert ((back_blocks - blocks).abs() <= bound).all(), key
        changed += int(not torch.equal(got[key], tensor))
    assert changed == sum(t.dim() == 2 for t in model.state_dict().values())
    assert gguf.GGUFReader(file).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


def test_q8_0_writes_rows_of_no_whole_block_as_f16(tmp_path):
    model, folder = model_folder(tmp_path, "llama2-mha", hidden_size=40, intermediate_size=64, num_attention_heads=4,
                                 num_key_value_heads=4)  # fmt: skip
    file, back = round_trip(tmp_path, folder, "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(file).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16  # rows of 40 values
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 64: two blocks
    got = back_tensors(back)
    assert torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], model.model.layers[0].self_attn.q_proj.weight.half().float()
    )


def test_metadata_reads_in_the_gguf_package(tmp_path):
    model, folder = model_folder(tmp_path, "llama3-gqa-rope-llama3")
    file = export_gguf(folder, tmp_path / "gguf", "--template", "llama2")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(file).fields.items()}
    config = model.config
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "gguf"
    assert fields["llama.block_count"] == config.num_hidden_layers
    assert fields["llama.attention.head_count"] == config.num_attention_heads
    assert fields["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert fields["llama.context_length"] == config.max_position_embeddings
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.bos_token_id"] == 1
    assert fields["tokenizer.ggml.add_bos_token"] is True and "[INST]" in fields["tokenizer.chat_template"]
    assert file.name == "gguf-f16.gguf"


def tokenizer_round_trip(tmp_path, tokenizer_dir, *flags):
    """(the original tokenizer, the one `chipspan convert` rebuilds from the exported GGUF), for a model
    with as many embeddings as the tokenizer has tokens."""
    vocab_size = len(Tokenizer.from_folder(tokenizer_dir))
    _, folder = model_folder(tmp_path, "llama2-mha", tokenizer_dir, vocab_size=vocab_size, hidden_size=16,
                             intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    _, back = round_trip(tmp_path, folder, "f32", *flags)
    return Tokenizer.from_folder(folder), Tokenizer.from_folder(back)


def test_llama2_sentencepiece_tokenizer_survives(tmp_path):
    original, back = tokenizer_round_trip(tmp_path, LLAMA2_TOKENIZER)
    for text in TEXTS + ["<s>[INST] hi [/INST]</s>"]:
        assert back.encode(text, add_special_tokens=True) == original.encode(text, add_special_tokens=True), text
        assert back.decode(back.encode(text)) == original.decode(original.encode(text))
    assert (back.bos_token, back.eos_token, back.unk_token) == ("<s>", "</s>", "<unk>")


def test_smollm2_tokenizer_and_chat_template_survive(tmp_path, smollm2_dir):
    original, back = tokenizer_round_trip(tmp_path, smollm2_dir)
    for text in TEXTS + ["<|im_start|>user\nHi<|im_end|>\n"]:
        assert back.encode(text, add_special_tokens=True) == original.encode(text, add_special_tokens=True), text
    assert back.chat_template == original.chat_template and back.chat_template
    messages = [{"role": "user", "content": "Hi"}]
    assert back.apply_chat_template(messages, add_generation_prompt=True) == original.apply_chat_template(
        messages, add_generation_prompt=True
    )


def test_llama3_tokenizer_survives_as_llama_cpp_reads_it(tmp_path, llama3_tokenizer_dir):
    """llama.cpp takes a Llama-3 word found whole in the vocabulary as one token (as Meta's tiktoken
    does); this copy of tokenizer.json merges it from pieces. Everything else encodes the same."""
    original, back = tokenizer_round_trip(tmp_path, llama3_tokenizer_dir, "--template", "llama3",
                                          "--template_revision", "lf-0.9")  # fmt: skip
    for text in TEXTS + ["<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"]:
        assert back.encode(text, add_special_tokens=True) == original.encode(text, add_special_tokens=True), text
    assert back.encode(" việc") == [100769] and len(original.encode(" việc")) == 3
    assert "<|start_header_id|>" in back.chat_template


def test_a_lora_export_is_the_merged_model(tmp_path):
    from test_export import make_adapter

    _, folder = model_folder(tmp_path, "llama3-gqa-rope-llama3")
    make_adapter(folder, tmp_path / "adapter", 1, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    _, back = round_trip(tmp_path, folder, "f16", "--adapter_name_or_path", tmp_path / "adapter")
    assert main(["export", "--model_name_or_path", str(folder), "--adapter_name_or_path", str(tmp_path / "adapter"),
                 "--export_dir", str(tmp_path / "hf"), "--infer_dtype", "float16"]) == 0  # fmt: skip
    merged = back_tensors(tmp_path / "hf")
    got = back_tensors(back)
    assert sorted(got) == sorted(merged)
    for key, tensor in merged.items():  # norms are F32 in the GGUF, float16 in the folder
        assert torch.equal(got[key].half(), tensor), key
    unmerged = back_tensors(folder)
    assert not torch.equal(
        got["model.layers.0.self_attn.k_proj.weight"], unmerged["model.layers.0.self_attn.k_proj.weight"].half().float()
    )


@pytest.mark.parametrize(
    "variant, flags, message",
    [
        ("qwen2-qkv-bias", [], "llama-architecture models; this one is 'qwen2'"),
        ("llama-attention-bias", [], "biases on its projections"),
        ("llama-rope-dynamic-beyond-max", [], "rope_scaling type 'dynamic'"),
        ("llama2-mha", ["--export_size", "2"], "--export_size shards a Hugging Face folder"),
        ("llama2-mha", ["--infer_dtype", "float16"], "--infer_dtype sets a Hugging Face folder's dtype"),
        ("llama2-mha", ["--export_legacy_format", "true"], "--export_legacy_format writes .bin weights"),
        ("llama2-mha", ["--export_quantization", "q4_k"], "q4_k"),
    ],
)
def test_what_a_gguf_cannot_hold_is_one_line_before_anything_is_written(
    tmp_path, capsys, monkeypatch, variant, flags, message
):
    _, folder = model_folder(tmp_path, variant)
    monkeypatch.setattr("chipspan.export.command.merged_parts", lambda *a: pytest.fail("weights were read"))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["export", "--model_name_or_path", str(folder), "--export_dir", str(out), "--export_format", "gguf",
                 "--template", "llama2", *flags]) == 1  # fmt: skip
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert len(err) == 1 and err[0].startswith("chipspan: error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failure_midway_leaves_nothing_and_an_export_is_replaced_only_when_asked(tmp_path, monkeypatch, capsys):
    _, folder = model_folder(tmp_path, "llama2-mha")
    out = tmp_path / "out"
    file = export_gguf(folder, out)
    before = file.read_bytes()

    def failing_parts(*args):
        yield {"model.embed_tokens.weight": torch.zeros(32000, 32)}
        raise OSError("disk full")

    monkeypatch.setattr("chipspan.export.command.merged_parts", failing_parts)
    with pytest.raises(OSError):
        main(["export", "--model_name_or_path", str(folder), "--export_dir", str(out), "--export_format", "gguf",
              "--overwrite_output_dir"])  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"] and file.read_bytes() == before
    monkeypatch.undo()
    assert (
        main(["export", "--model_name_or_path", str(folder), "--export_dir", str(out), "--export_format", "gguf"]) == 1
    )
    assert "add --overwrite_output_dir" in capsys.readouterr().err
    assert export_gguf(folder, out, "--overwrite_output_dir", "--export_quantization", "q8_0").name == "out-q8_0.gguf"
    assert sorted(p.name for p in out.iterdir()) == ["chipspan_manifest.json", "out-q8_0.gguf"]


def test_f16_refuses_values_beyond_its_range_and_leaves_nothing(tmp_path, capsys):
    model, folder = model_folder(tmp_path, "llama2-mha")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = 1e5
    model.save_pretrained(folder)
    capsys.readouterr()
    out = tmp_path / "out"
    assert (
        main(["export", "--model_name_or_path", str(folder), "--export_dir", str(out), "--export_format", "gguf"]) == 1
    )
    assert "blk.1.ffn_up.weight holds values beyond float16's range" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert export_gguf(folder, out, "--export_quantization", "bf16").name == "out-bf16.gguf"


def test_rope_rows_permute_and_unpermute_are_inverse():
    from chipspan.models.gguf_import import unpermute_rope_rows

    w = torch.arange(8 * 2 * 3, dtype=torch.float32).reshape(16, 3)
    permuted = gguf_export.permute_rope_rows(w, 2)
    assert not torch.equal(permuted, w)
    assert np.array_equal(unpermute_rope_rows(permuted.numpy(), 2), w.numpy())
    # head 0: HF rows 0..3 pair with 4..7; ggml keeps each pair side by side
    assert permuted[:, 0].tolist()[:8] == [0, 12, 3, 15, 6, 18, 9, 21]
