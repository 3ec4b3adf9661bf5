"""Write a Llama model as one GGUF file (llama.cpp's format): the inverse of ``gguf_import``.

What ``chipspan convert`` undoes is done here: HF names become GGUF names, the rows of ``q_proj``
and ``k_proj`` are permuted to ggml's rotary pairing (:func:`permute_rope_rows`), a llama3
``rope_scaling`` becomes the ``rope_freqs`` tensor, and the tokenizer becomes ``tokenizer.ggml.*``
metadata (``gpt2`` for byte-level BPE, ``llama`` for SentencePiece BPE with byte fallback).

Tensor types, by ``quantization``: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the matrices; vectors
(the norms) stay F32 as llama.cpp keeps them, and under ``q8_0`` a matrix whose rows are not a whole
number of 32-value blocks is written F16 (the file type still says Q8_0, as llama.cpp's own files do).

The header (metadata, every tensor's name, shape and type) is written first, then the tensors one
by one as they arrive: the file is streamed, so memory holds one model part, never the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import gguf
import numpy as np
import torch

from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig
from chipspan.models.gguf_import import (
    GLOBAL_NAMES,
    LAYER_NAMES,
    LLAMA3_SPLIT,
    ROPE_FREQS,
    llama3_divisors,
    rope_wavelengths,
    sentencepiece_merges,
)
from chipspan.models.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
QUANTIZATIONS = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_HF_TO_GGUF = {f"{hf}.weight": f"{name}.weight" for name, hf in GLOBAL_NAMES.items()}
_LAYER_TO_GGUF = {f"{hf}.weight": name for name, hf in LAYER_NAMES.items()}
_NORMAL, _UNKNOWN, _CONTROL = int(gguf.TokenType.NORMAL), int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL)
_USER_DEFINED, _UNUSED, _BYTE = (
    int(gguf.TokenType.USER_DEFINED),
    int(gguf.TokenType.UNUSED),
    int(gguf.TokenType.BYTE),
)
_SPIECE_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ],
}


def write_gguf(
    out_file: Path,
    config: ModelConfig,
    tokenizer: Tokenizer,
    shapes: Mapping[str, tuple[int, ...]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    quantization: str = "f16",
    name: str = "model",
    eot_token: str | None = None,
) -> Path:
    """Write ``out_file``: ``config`` and ``tokenizer`` as metadata, then ``tensors``.

    ``shapes``: every HF tensor name -> shape, in the order ``tensors`` yields ``(HF name, tensor)``
    (``chipspan.export.merge.tensor_shapes`` and ``merged_parts``). ``eot_token``: the token that
    ends a turn (the template's stop word), written as llama.cpp's end-of-turn id.
    Everything is checked before the first byte is written.
    """
    if quantization not in QUANTIZATIONS:
        raise ChipspanError(
            f"GGUF type {quantization!r} is not one chipspan writes; choose: {', '.join(QUANTIZATIONS)}"
        )
    check_config(config)
    metadata = model_metadata(config, quantization, name) | tokenizer_metadata(tokenizer, config.vocab_size, eot_token)
    plan = [(_gguf_name(hf), hf, shape, _tensor_type(shape, quantization)) for hf, shape in shapes.items()]
    rope_freqs = _rope_freqs(config)

    writer = gguf.GGUFWriter(out_file, "llama")
    for key, (value, kind) in metadata.items():
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)  # typed by its first element: text, INT32 or FLOAT32
        else:
            writer.add_key_value(key, value, kind)
    if rope_freqs is not None:
        writer.add_tensor_info(ROPE_FREQS, rope_freqs.shape, np.float32, rope_freqs.nbytes, Q.F32)
    for gguf_name, _, shape, qtype in plan:
        writer.add_tensor_info(gguf_name, shape, np.float32, _nbytes(shape, qtype), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if rope_freqs is not None:
        writer.write_tensor_data(rope_freqs)
    expected = iter(plan)
    for hf, tensor in tensors:
        gguf_name, planned, shape, qtype = next(expected, (None, None, None, None))
        if hf != planned or tuple(tensor.shape) != shape:
            raise AssertionError(f"GGUF export planned {planned} {shape}, was given {hf} {tuple(tensor.shape)}")
        writer.write_tensor_data(_encode(gguf_name, _to_ggml_rows(hf, tensor, config), qtype))
    if next(expected, None) is not None:
        raise AssertionError("GGUF export was given fewer tensors than it planned")
    writer.close()
    return out_file


def check_config(config: ModelConfig) -> None:
    """Refuse a model GGUF's llama architecture cannot describe, naming what and what to do."""
    if config.model_type not in ("llama", "mistral"):
        raise ChipspanError(
            f"GGUF export writes llama-architecture models; this one is {config.model_type!r}: export it "
            "as a Hugging Face folder (--export_format hf) and convert that with llama.cpp's converter"
        )
    if config.attention_bias or config.o_proj_bias or config.mlp_bias:
        raise ChipspanError("the model has biases on its projections, which a llama GGUF has no place for")
    if config.rope_type not in ("default", "linear", "llama3"):
        raise ChipspanError(
            f"rope_scaling type {config.rope_type!r} has no llama GGUF form chipspan writes (default, linear, llama3)"
        )


def model_metadata(config: ModelConfig, quantization: str, name: str) -> dict[str, tuple[object, object]]:
    """``general.*`` and ``llama.*`` keys -> (value, GGUF value type)."""
    u32, f32, text = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING
    keys = {
        "general.name": (name, text),
        "general.file_type": (int(_FILE_TYPES[quantization]), u32),
        "general.quantization_version": (gguf.GGML_QUANT_VERSION, u32),
        "llama.vocab_size": (config.vocab_size, u32),
        "llama.context_length": (config.max_position_embeddings, u32),
        "llama.embedding_length": (config.hidden_size, u32),
        "llama.block_count": (config.num_hidden_layers, u32),
        "llama.feed_forward_length": (config.intermediate_size, u32),
        "llama.attention.head_count": (config.num_attention_heads, u32),
        "llama.attention.head_count_kv": (config.num_key_value_heads, u32),
        "llama.rope.dimension_count": (config.head_dim, u32),
        "llama.rope.freq_base": (float(config.rope_theta), f32),
        "llama.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), f32),
    }
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        keys["llama.attention.key_length"] = (config.head_dim, u32)
        keys["llama.attention.value_length"] = (config.head_dim, u32)
    if config.rope_type == "linear":
        keys["llama.rope.scaling.type"] = ("linear", text)
        keys["llama.rope.scaling.factor"] = (float(config.rope_scaling["factor"]), f32)
    return keys


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int, eot_token: str | None = None) -> dict:
    """``tokenizer.*`` keys -> (value, GGUF value type), from chipspan's tokenizer.

    The token list is as long as the model's embeddings (rows no token names are ``[PADn]``,
    unused). Special added tokens are control tokens, other added ones user-defined.
    """
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ChipspanError(
            f"the tokenizer is {model.get('type')!r}; GGUF export writes BPE tokenizers (byte-level or SentencePiece)"
        )
    added = {i: t for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if len(tokenizer) > vocab_size or any(i >= vocab_size for i in vocab.values()):
        raise ChipspanError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's {vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, _NORMAL
    for i, token in added.items():
        types[i] = _CONTROL if token.special else _USER_DEFINED
    byte_level = _byte_level_pre(spec)
    string, array = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
    merges = [_merge_text(m) for m in model.get("merges", [])]
    if byte_level is not None:
        keys = {
            "tokenizer.ggml.model": ("gpt2", string),
            "tokenizer.ggml.pre": (byte_level, string),
            "tokenizer.ggml.merges": (merges, array),
        }
    else:
        unk = tokenizer.unk_token_id
        if unk is not None:
            types[unk] = _UNKNOWN
        for i, token in enumerate(tokens):
            if types[i] == _NORMAL and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types[i] = _BYTE
        keys = {
            "tokenizer.ggml.model": ("llama", string),
            "tokenizer.ggml.scores": (_sentencepiece_scores(spec, model, tokens, types, merges), array),
        }
    keys["tokenizer.ggml.tokens"] = (tokens, array)
    keys["tokenizer.ggml.token_type"] = (types, array)
    u32, boolean = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.BOOL
    for key, token_id in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unknown", tokenizer.unk_token_id),
        ("padding", tokenizer.pad_token_id if "pad" in tokenizer.special_tokens else None),
        ("eot", tokenizer.token_to_id(eot_token) if eot_token else None),
    ):
        if token_id is not None:
            keys[f"tokenizer.ggml.{key}_token_id"] = (token_id, u32)
    add_bos, add_eos = _added_specials(tokenizer)
    keys["tokenizer.ggml.add_bos_token"] = (add_bos, boolean)
    keys["tokenizer.ggml.add_eos_token"] = (add_eos, boolean)
    template = tokenizer.chat_template
    template = template.get("default") if isinstance(template, dict) else template
    if template:
        keys["tokenizer.chat_template"] = (template, string)
    return keys


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF row order of a ``q_proj``/``k_proj`` weight, ``[n_heads*d, in]``, to ggml's: HF pairs
    feature ``j`` of a head with ``j + d/2``, ggml pairs ``2j`` with ``2j+1``; the inverse of
    ``gguf_import.unpermute_rope_rows``."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _byte_level_pre(spec: dict) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` name of a byte-level tokenizer; None for SentencePiece."""
    pre, decoder = spec.get("pre_tokenizer"), spec.get("decoder") or {}
    if pre is None and (spec.get("model") or {}).get("byte_fallback"):
        if spec.get("normalizer") != _SPIECE_NORMALIZER:
            raise ChipspanError(
                "the SentencePiece tokenizer normalizes text in a way a llama GGUF cannot describe "
                "(chipspan writes Llama 2's: prepend '▁', spaces as '▁')"
            )
        return None
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") if isinstance(step, dict) else None for step in steps]
    if decoder.get("type") != "ByteLevel" or spec.get("normalizer") is not None or kinds[-1:] != ["ByteLevel"]:
        raise ChipspanError(
            "the tokenizer is neither byte-level BPE nor Llama 2's SentencePiece, the kinds a llama GGUF "
            "describes; export it as a Hugging Face folder (--export_format hf)"
        )
    byte_level = steps[-1]
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern") == {"Regex": LLAMA3_SPLIT}:
        if steps[0].get("behavior") == "Isolated" and not byte_level.get("use_regex", True):
            return "llama-bpe"
    raise ChipspanError(
        f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) is not one chipspan names for "
        "llama.cpp (GPT-2's, SmolLM's, Llama 3's); export it as a Hugging Face folder (--export_format hf)"
    )


def _merge_text(merge: str | list) -> str:
    """A merge as GGUF lists it, ``"left right"``."""
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    if " " in left or " " in right:
        raise ChipspanError(f"the tokenizer merges {left!r} with {right!r}; a GGUF merge list cannot hold spaces")
    return f"{left} {right}"


def _sentencepiece_scores(spec: dict, model: dict, tokens: list[str], types: list[int], merges: list[str]) -> list:
    """A score per token from which the importer rebuilds exactly the tokenizer's merges, in order.

    The importer ranks merges by their piece's score, ties by the parts' ids. So a piece scores minus
    the rank of its first merge, except that pieces whose merges interleave in the list share one
    score (the first of them): their order is then the ids' (0 for pieces no merge makes). Checked.
    """
    spans: dict[str, list[int]] = {}
    for i, merge in enumerate(merges):
        spans.setdefault(merge.replace(" ", ""), [i, i])[1] = i
    score, end = {}, -1
    for piece, (first, last) in sorted(spans.items(), key=lambda item: item[1]):
        if first > end:  # a new run of pieces whose merges do not interleave with earlier ones
            run_score = -float(first)
        score[piece], end = run_score, max(end, last)
    scores = [score.get(token, 0.0) if kind == _NORMAL else 0.0 for token, kind in zip(tokens, types)]
    first_id = {}
    for i, token in enumerate(tokens):
        first_id.setdefault(token, i)
    rebuilt = [f"{left} {right}" for left, right in sentencepiece_merges(tokens, types, scores, first_id)]
    if rebuilt != merges:
        raise ChipspanError(
            "the SentencePiece tokenizer's merges do not follow from its pieces (a GGUF keeps scores, not "
            "merges); export it as a Hugging Face folder (--export_format hf)"
        )
    return scores


def _added_specials(tokenizer: Tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS in front and EOS at the end."""
    plain, special = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and special[:1] == [bos] and plain[:1] != [bos]
    add_eos = eos is not None and special[-1:] == [eos] and plain[-1:] != [eos]
    return add_bos, add_eos


def _gguf_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``."""
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_TO_GGUF:
        return f"blk.{parts[2]}.{_LAYER_TO_GGUF[parts[3]]}.weight"
    raise ChipspanError(f"tensor {hf_name} has no place in a llama GGUF")


def _tensor_type(shape: tuple[int, ...], quantization: str) -> gguf.GGMLQuantizationType:
    if len(shape) == 1:
        return Q.F32
    qtype = QUANTIZATIONS[quantization]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else Q.F16


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _to_ggml_rows(hf_name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """fp32, with the rotary rows of q_proj / k_proj in ggml's order."""
    tensor = tensor.float()
    if hf_name.endswith("self_attn.q_proj.weight"):
        return permute_rope_rows(tensor, config.num_attention_heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return permute_rope_rows(tensor, config.num_key_value_heads)
    return tensor


def _encode(gguf_name: str, tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """One fp32 tensor as the bytes of ``qtype``."""
    if qtype == Q.F32:
        return tensor.contiguous().numpy()
    if qtype == Q.F16:
        half = tensor.to(torch.float16)
        if torch.isinf(half).any() and not torch.isinf(tensor).any():
            raise ChipspanError(
                f"{gguf_name} holds values beyond float16's range (±65504); export --export_quantization bf16 or f32"
            )
        return half.contiguous().numpy()
    if qtype == Q.BF16:
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return gguf.quants.quantize(tensor.contiguous().numpy(), qtype)


def _rope_freqs(config: ModelConfig) -> np.ndarray | None:
    """llama3 scaling as llama.cpp stores it: the divisor of each rotary frequency, ``[head_dim/2]``."""
    if config.rope_type != "llama3":
        return None
    wavelen = rope_wavelengths(config.rope_theta, config.head_dim)
    return llama3_divisors(config.rope_scaling, wavelen).astype(np.float32)
