"""Convert a Llama-architecture GGUF file (llama.cpp's format) into a Hugging Face model folder.

The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (HF key names,
HF row order, in the dtype asked) and the tokenizer files, so that chipspan's own loader and
``transformers.AutoModelForCausalLM.from_pretrained`` both read it.

Three things differ between the formats and are undone here:

- shapes: GGUF lists dimensions fastest-first (``ne``), so a ``[out, in]`` HF matrix reads
  ``ne = [in, out]``; ``gguf.GGUFReader`` already hands out arrays in ``reversed(ne)`` order;
- quantization: blocks of Q4_0/Q4_1/Q8_0/K-quants/... are expanded with ``gguf.quants.dequantize``;
- rotary layout: llama.cpp permutes the rows of ``q``/``k`` (see :func:`unpermute_rope_rows`).

Every check runs before the first weight is read. The conversion writes into a hidden sibling
folder, seals it with chipspan's manifest (``chipspan.manifest``: every file, size and sha256) and
renames it at the end: a failed run leaves neither a half-written ``out_dir`` nor a damaged earlier
one. ``overwrite`` replaces only a folder an earlier conversion wrote, and only while it holds
nothing else.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from chipspan import sealed_output
from chipspan.errors import ChipspanError

CONVERTED = "converted"  # the kind of folder the manifest of a conversion marks
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
ROPE_FREQS = "rope_freqs.weight"

# Files of a Hugging Face tokenizer folder, copied as they are when ``tokenizer_dir`` is given.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_PASS_TOKENIZER_DIR = "pass tokenizer_dir (a Hugging Face folder with the model's tokenizer.json)"

# The pre-tokenizer split of Llama 3 (tiktoken's pattern), llama.cpp's "llama-bpe".
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NORMAL, _UNKNOWN = int(gguf.TokenType.NORMAL), int(gguf.TokenType.UNKNOWN)
_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
_REQUIRED = object()


def convert_gguf(gguf_path, out_dir, dtype="float32", tokenizer_dir=None, overwrite=False) -> Path:
    """Convert a Llama GGUF file into a Hugging Face folder at ``out_dir``; return ``out_dir``.

    ``dtype``: "float32" | "float16" | "bfloat16", the dtype of the written weights.
    ``tokenizer_dir``: a Hugging Face folder whose tokenizer files are copied instead of building
    a tokenizer from the GGUF metadata (see :func:`build_tokenizer` for the kinds that are built).
    ``overwrite``: replace an ``out_dir`` an earlier conversion wrote (only once the new folder is
    complete); a folder holding anything else is refused.
    Problems with the input raise :class:`ChipspanError`.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise ChipspanError(f"dtype {dtype!r} is not supported; choose one of: {', '.join(DTYPES)}")
    _check_out_dir(out_dir, gguf_path, overwrite)
    reader = open_gguf(gguf_path)
    config = hf_config(reader, dtype)
    plan = _tensor_plan(reader, config)
    if tokenizer_dir is None:
        meta = {key: f.contents() for key, f in reader.fields.items() if key.startswith("tokenizer.")}
        tokenizer_files = build_tokenizer(meta, config["max_position_embeddings"])
    else:
        tokenizer_files = _read_tokenizer_dir(Path(tokenizer_dir))

    with sealed_output.writing(out_dir, CONVERTED) as tmp:
        (tmp / "config.json").write_text(_json(config))
        (tmp / "generation_config.json").write_text(_json(_generation_config(config)))
        _write_safetensors(tmp / "model.safetensors", plan, DTYPES[dtype])
        for name, content in tokenizer_files.items():
            (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return out_dir


def open_gguf(path) -> gguf.GGUFReader:
    """Open ``path`` with ``gguf.GGUFReader`` (memory-mapped), turning failures into one-liners."""
    path = Path(path)
    if not path.exists():
        raise ChipspanError(f"GGUF file {path} does not exist; check the path")
    if not path.is_file():
        raise ChipspanError(f"{path} is not a file; pass the path of a .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ChipspanError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader signals a short or damaged file in many ways
        raise ChipspanError(f"GGUF file {path} is truncated or corrupt ({e}); download it again") from e


def hf_config(reader: gguf.GGUFReader, dtype: str) -> dict:
    """The HF ``config.json`` content of a llama GGUF, from its metadata and tensor shapes."""
    arch = _field(reader, "general.architecture", None)
    if arch != "llama":
        raise ChipspanError(f"GGUF architecture {arch!r} is not supported; chipspan converts: llama")
    if int(_field(reader, "split.count", 1)) > 1:
        raise ChipspanError("GGUF file is one part of a split model; merge the parts first (llama-gguf-split --merge)")
    hidden = int(_field(reader, "llama.embedding_length"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = _field(reader, "llama.attention.head_count_kv", n_head)
    if isinstance(n_kv, list):
        raise ChipspanError("GGUF gives a KV head count per layer; chipspan needs one for all layers")
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // n_head))
    if int(_field(reader, "llama.attention.value_length", head_dim)) != head_dim:
        raise ChipspanError("GGUF has different key and value head sizes; Llama needs them equal")
    if int(_field(reader, "llama.rope.dimension_count", head_dim)) != head_dim:
        raise ChipspanError("GGUF rotates only part of each head (rope.dimension_count); Llama rotates all")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ChipspanError("GGUF has no token_embd.weight tensor; it is not a complete llama model")
    theta = _short_float(_field(reader, "llama.rope.freq_base", 10000.0))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _short_float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(reader, tensors.get(ROPE_FREQS), theta, head_dim),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }
    for key in ("bos", "eos", "padding"):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
        config[f"{key[:3]}_token_id"] = None if token_id is None else int(token_id)
    return config


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a ``q_proj``/``k_proj`` weight, ``[n_heads*d, in]``.

    HF's rotary embedding pairs feature ``j`` of a head with feature ``j + d/2`` (``rotate_half``);
    ggml's pairs ``2j`` with ``2j+1``. llama.cpp's converter therefore moves HF row
    ``h*d + c*d/2 + j`` (head ``h``, half ``c`` in {0, 1}, ``j < d/2``) to GGUF row ``h*d + 2j + c``,
    with ``n_heads`` = attention heads for ``q`` and KV heads for ``k``. Reading the GGUF rows as
    ``[h, j, c]`` and swapping the last two indices gives ``[h, c, j]``: the HF order. Quantization
    works row by row, so it commutes with this and dequantizing first is exact.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def build_tokenizer(meta: dict, model_max_length: int) -> dict[str, str]:
    """The tokenizer files (``{file name: text}``) of a GGUF's tokenizer.

    ``meta``: the GGUF's ``tokenizer.*`` metadata, keys as in the file. Two kinds are rebuilt:
    ``gpt2`` (byte-level BPE: SmolLM, Llama 3, ...) and ``llama`` (SentencePiece BPE with byte
    fallback: Llama 1/2, Mistral, TinyLlama, ...). Gives ``tokenizer.json`` (built with the
    ``tokenizers`` library), ``tokenizer_config.json`` and ``special_tokens_map.json``. Control (and,
    for SentencePiece, unknown) tokens become special added tokens and user-defined ones plain
    added tokens, each keeping its GGUF id.
    """
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise ChipspanError(f"GGUF carries no tokenizer; {_PASS_TOKENIZER_DIR}")
    if kind not in ("gpt2", "llama"):
        raise ChipspanError(
            f"GGUF tokenizer model {kind!r} cannot be rebuilt exactly (chipspan builds 'gpt2', byte-level "
            f"BPE, and 'llama', SentencePiece BPE); {_PASS_TOKENIZER_DIR}"
        )
    types = meta.get("tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    if kind == "gpt2":
        tokenizer, add_bos_default = _byte_level_bpe(meta, vocab)
        special_types = (_CONTROL,)
    else:
        tokenizer, add_bos_default = _sentencepiece_bpe(meta, tokens, types, vocab), True
        special_types = (_CONTROL, _UNKNOWN)
    special_ids = {i: t for i, (t, k) in enumerate(zip(tokens, types)) if k in special_types}
    user_defined = {i: t for i, (t, k) in enumerate(zip(tokens, types)) if k == _USER_DEFINED}
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_ids.values()])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined.values()])
    for i, token in {**special_ids, **user_defined}.items():
        if tokenizer.token_to_id(token) != i:
            raise ChipspanError(f"GGUF tokenizer lists {token!r} twice; {_PASS_TOKENIZER_DIR}")

    special = {}
    names = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}
    for key, name in names.items():
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and token_id < len(tokens):
            special[name] = tokens[token_id]
    # Absent keys mean llama.cpp's defaults: BOS for Llama 3's and SentencePiece tokenizers, else nothing.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and "bos_token" in special
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in special
    tokenizer.post_processor = _post_processor(
        tokenizer,
        special["bos_token"] if add_bos else None,
        special["eos_token"] if add_eos else None,
        byte_level=kind == "gpt2",
    )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        **({"legacy": True} if kind == "llama" else {}),  # how transformers names this SentencePiece split
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": _json(tokenizer_config),
        "special_tokens_map.json": _json(special),
    }


def _byte_level_bpe(meta: dict, vocab: dict[str, int]) -> tuple[Tokenizer, bool]:
    """A ``gpt2`` GGUF tokenizer (merges listed in the file); whether BOS is added by default."""
    pre_tokenizer, llama3 = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    merges = [_split_merge(m) for m in meta.get("tokenizer.ggml.merges", [])]
    # Like tiktoken, llama.cpp takes a Llama-3 word found whole in the vocabulary as one token.
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=llama3))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, llama3


def _sentencepiece_bpe(meta: dict, tokens: list[str], types: list[int], vocab: dict[str, int]) -> Tokenizer:
    """A ``llama`` GGUF tokenizer: SentencePiece BPE over ``▁``-joined text, unknown bytes as ``<0xNN>``.

    SentencePiece keeps no merge list, only a score per piece; a BPE that merges the best-scored
    piece first is the same tokenizer. So every split of a normal piece into two pieces of the
    vocabulary is a merge, ranked by the whole piece's score (higher first), ties by the ids of the
    left and then the right part. Checked against Llama 2's own tokenizer.json: the same 61,249
    merges in the same order.
    """
    scores = meta.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise ChipspanError(f"GGUF SentencePiece tokenizer has no score for every token; {_PASS_TOKENIZER_DIR}")
    merges = sentencepiece_merges(tokens, types, scores, vocab)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return tokenizer


def sentencepiece_merges(
    tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """The BPE merges of a SentencePiece vocabulary: every split of a normal piece into two pieces of
    ``vocab`` (token -> first id), best-scored piece first, ties by the left then the right part's id."""
    ranked = []
    for piece_id, (piece, kind) in enumerate(zip(tokens, types)):
        if kind != _NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if left is not None and right is not None:
                ranked.append((-scores[piece_id], left, right))
    ranked.sort()
    return [(tokens[left], tokens[right]) for _, left, right in ranked]


def _split_merge(merge: str) -> tuple[str, str]:
    """``"a b"`` -> ``("a", "b")``: the first space after the first character separates (as in llama.cpp)."""
    cut = merge.index(" ", 1)
    return merge[:cut], merge[cut + 1 :]


def _byte_level_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The HF pre-tokenizer matching llama.cpp's ``tokenizer.ggml.pre`` name; whether it is Llama 3's."""
    if pre in ("smollm", "starcoder", "refact"):  # digits one by one, then GPT-2's split
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        ), False
    if pre == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ), True
    raise ChipspanError(
        f"GGUF pre-tokenizer {pre!r} is not known to chipspan (known: smollm, starcoder, refact, gpt-2, "
        f"llama-bpe); {_PASS_TOKENIZER_DIR}"
    )


def _post_processor(
    tokenizer: Tokenizer, bos: str | None, eos: str | None, byte_level: bool
) -> processors.PostProcessor | None:
    """BOS/EOS around each sequence when the GGUF asks to add them, after byte-level offsets when
    ``byte_level``; None when there is nothing to do."""
    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    if bos is not None or eos is not None:

        def template(seq: str, type_id: int) -> list[str]:
            return [f"{t}:{type_id}" for t in (bos, f"${seq}", eos) if t is not None]

        specials = [(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(t for t in (bos, eos) if t is not None)]
        steps.append(
            processors.TemplateProcessing(
                single=template("A", 0),
                pair=template("A", 0) + template("B", 1),
                special_tokens=specials,
            )
        )
    return steps[0] if len(steps) == 1 else processors.Sequence(steps) if steps else None


def _rope_scaling(reader, rope_freqs, theta: float, head_dim: int) -> dict | None:
    """HF ``rope_scaling`` from the GGUF's ``rope.scaling.*`` keys or its ``rope_freqs`` tensor."""
    kind = _field(reader, "llama.rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _short_float(_field(reader, "llama.rope.scaling.factor"))}
    if kind != "none":
        raise ChipspanError(f"GGUF rope scaling {kind!r} is not supported; chipspan converts: linear, llama3")
    if rope_freqs is None:
        return None
    divisors = gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type).astype(np.float64).ravel()
    return llama3_rope_scaling(divisors, theta, head_dim)


def llama3_rope_scaling(divisors: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """Recover HF's llama3 ``rope_scaling`` from llama.cpp's ``rope_freqs`` divisors, ``[head_dim/2]``.

    For frequency ``f_i = theta^(-2i/head_dim)``, wavelength ``w_i = 2*pi/f_i``, llama3 scaling
    (context ``L``, factors ``lo < hi``, ``factor``) divides ``f_i`` by ``r_i``: 1 when
    ``w_i < L/hi``, ``factor`` when ``w_i > L/lo``, else ``1 / ((1-s)/factor + s)`` with
    ``s = (L/w_i - lo)/(hi - lo) = A/w_i - B``. Only ``A = L/(hi-lo)`` and ``B = lo/(hi-lo)`` are
    determined (the thresholds are ``s = 1`` and ``s = 0``), so we fit them on the in-between
    frequencies and take ``lo = 1`` (Llama 3's value): ``hi = 1 + 1/B``, ``L = A/B``.
    The result is checked to reproduce every ``r_i``. ``None`` when nothing is scaled.
    """
    factor = _short_float(divisors.max())
    if factor <= 1.0:
        return None
    wavelen = rope_wavelengths(theta, head_dim)
    between = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    unknown = ChipspanError("GGUF rope_freqs tensor is not llama3 rope scaling; chipspan cannot convert it")
    if between.sum() < 2:
        raise unknown
    s = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor)
    a, minus_b = np.polyfit(1 / wavelen[between], s, 1)
    high = round(1 - 1 / minus_b, 4)
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": high,
        "original_max_position_embeddings": int(round(a * (high - 1))),
    }
    if not np.allclose(llama3_divisors(scaling, wavelen), divisors, rtol=1e-4):
        raise unknown
    return scaling


def rope_wavelengths(theta: float, head_dim: int) -> np.ndarray:
    """The wavelength of each rotary frequency, ``2*pi / theta^(-2i/head_dim)``, ``[head_dim/2]``."""
    return 2 * np.pi * theta ** (np.arange(head_dim // 2) * 2 / head_dim)


def llama3_divisors(scaling: dict, wavelen: np.ndarray) -> np.ndarray:
    """The per-frequency divisors llama3 scaling applies, ``[head_dim/2]`` (HF's formula); llama.cpp
    stores them as the ``rope_freqs`` tensor."""
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    s = np.clip((scaling["original_max_position_embeddings"] / wavelen - lo) / (hi - lo), 0, 1)
    return 1 / ((1 - s) / factor + s)


def _tensor_plan(reader, config: dict) -> list[tuple[str, object, int | None]]:
    """``(hf_name, gguf tensor, heads to unpermute or None)`` per weight, after checking that the
    tensors, their shapes and their quant types are what a Llama model of ``config`` needs."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    q_rows, kv_rows = n_head * config["head_dim"], n_kv * config["head_dim"]
    shapes = {
        "model.embed_tokens": (vocab, hidden),
        "model.norm": (hidden,),
        "lm_head": (vocab, hidden),
        "self_attn.q_proj": (q_rows, hidden),
        "self_attn.k_proj": (kv_rows, hidden),
        "self_attn.v_proj": (kv_rows, hidden),
        "self_attn.o_proj": (hidden, q_rows),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
    }
    heads = {"self_attn.q_proj": n_head, "self_attn.k_proj": n_kv}
    plan = []
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        name = _hf_name(t.name, config["num_hidden_layers"])
        kind = re.sub(r"^model\.layers\.\d+\.", "", name).removesuffix(".weight")
        shape = tuple(int(n) for n in reversed(t.shape))
        if shape != shapes[kind]:
            raise ChipspanError(
                f"GGUF tensor {t.name} has shape {list(shape)}, the metadata implies {list(shapes[kind])}"
            )
        if not _can_dequantize(t.tensor_type):
            raise ChipspanError(
                f"GGUF tensor {t.name} is stored as {t.tensor_type.name}, which the installed gguf package "
                "cannot dequantize; upgrade gguf (pip install -U gguf) or use another quantization"
            )
        plan.append((name, t, heads.get(kind)))
    layers = range(config["num_hidden_layers"])
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in layers for n in LAYER_NAMES.values()
    }
    missing = sorted(expected - {name for name, _, _ in plan})
    if missing:
        raise ChipspanError(
            f"GGUF lacks {len(missing)} tensors (first: {missing[0]}); it is not a complete llama model"
        )
    return plan


def _hf_name(gguf_name: str, n_layers: int) -> str:
    """HF key of a GGUF tensor: ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m[2] in LAYER_NAMES and int(m[1]) < n_layers:
        return f"model.layers.{m[1]}.{LAYER_NAMES[m[2]]}.weight"
    base = gguf_name.removesuffix(".weight")
    if gguf_name.endswith(".weight") and base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.weight"
    raise ChipspanError(f"GGUF tensor {gguf_name!r} has no place in a plain Llama model")


def _can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants.dequantize`` handles ``qtype`` (tried on one zero block)."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _write_safetensors(path: Path, plan: list, dtype: torch.dtype) -> None:
    """Write the planned tensors to one safetensors file, converting one tensor at a time.

    The header (shapes and byte ranges) is known before any data is read, so the file is streamed:
    peak memory is about one tensor, not the model.
    """
    itemsize, kind = torch.empty((), dtype=dtype).element_size(), _SAFETENSORS_DTYPE[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t, _ in plan:
        shape = [int(n) for n in reversed(t.shape)]
        size = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": kind, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for _name, t, n_heads in plan:
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
            if n_heads is not None:
                w = unpermute_rope_rows(w, n_heads)
            w = torch.from_numpy(np.array(w, dtype=np.float32, order="C")).to(dtype)
            f.write(w.view(torch.uint8).numpy().data)


def _read_tokenizer_dir(tokenizer_dir: Path) -> dict[str, bytes]:
    """The tokenizer files of a Hugging Face folder, ``{file name: bytes}``, checked to hold a tokenizer."""
    if not tokenizer_dir.is_dir():
        raise ChipspanError(f"tokenizer_dir {tokenizer_dir} is not a folder; {_PASS_TOKENIZER_DIR}")
    files = {n: (tokenizer_dir / n).read_bytes() for n in _TOKENIZER_FILES if (tokenizer_dir / n).is_file()}
    if "tokenizer.json" not in files and "tokenizer.model" not in files:
        raise ChipspanError(f"tokenizer_dir {tokenizer_dir} holds no tokenizer.json or tokenizer.model")
    return files


def _generation_config(config: dict) -> dict:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: config[key] for key in keys if config[key] is not None}


def _check_out_dir(out_dir: Path, gguf_path: Path, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that cannot be replaced (see ``sealed_output.check_replaceable``), or that holds the GGUF."""
    if overwrite and out_dir.is_dir() and out_dir.resolve() in gguf_path.resolve().parents:
        raise ChipspanError(f"GGUF file {gguf_path} lies inside the output folder; choose another folder")
    sealed_output.check_replaceable(out_dir, CONVERTED, "chipspan convert", overwrite, "use overwrite")


def _field(reader, key: str, default=_REQUIRED):
    """The value of metadata ``key``; ``default`` when absent (a ChipspanError if no default)."""
    field = reader.fields.get(key)
    if field is not None:
        return field.contents()
    if default is _REQUIRED:
        raise ChipspanError(f"GGUF lacks the metadata key {key!r}; it is not a complete llama model")
    return default


def _short_float(value: float) -> float:
    """A float32 value as the shortest decimal that reads back the same (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _json(content: dict) -> str:
    return json.dumps(content, indent=2, ensure_ascii=False) + "\n"
