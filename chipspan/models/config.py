"""Model configuration read from a Hugging Face ``config.json``.

One dataclass covers every supported decoder; the variants differ only in flags:

- ``llama``   Llama-2 (multi-head) and Llama-3 (grouped-query attention, ``rope_scaling`` type
              ``llama3``), SmolLM-style models (tied embeddings).
- ``mistral`` Llama layout; ``sliding_window`` is recorded but not applied, which is exact for
              sequences no longer than the window (4096 tokens and more in published models).
- ``qwen2``   Llama layout with a bias on the q/k/v projections.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chipspan.errors import ChipspanError, shown

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_ACTIVATIONS = ("silu", "swish")
# The largest value of each size a config may give; published models are far below these. They keep
# what a config makes chipspan do (build a meta model, price each layer) bounded.
_SIZES = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 22,
    "num_hidden_layers": 4096,
    "num_attention_heads": 1 << 14,
    "num_key_value_heads": 1 << 14,
    "head_dim": 1 << 14,
    "max_position_embeddings": 1 << 30,
    "sliding_window": 1 << 30,
}
_REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
MAX_CONFIG_BYTES = 16 << 20


@dataclass
class ModelConfig:
    """The shape and numerics of one decoder-only model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v
    o_proj_bias: bool = False  # bias on o (llama's attention_bias sets both)
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def parameters_per_layer(self) -> int:
        """Parameters of one decoder layer (attention, MLP, two norms)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.o_proj_bias:
            attn += h
        mlp = 3 * h * self.intermediate_size
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + h
        return attn + mlp + 2 * h

    @property
    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + self.num_hidden_layers * self.parameters_per_layer + self.hidden_size + head

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Validate an HF config dict; raise ChipspanError naming the first problem."""
        model_type = raw.get("model_type")
        if model_type is None:
            raise ChipspanError(f"{source} has no 'model_type'; add one of: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ChipspanError(
                f"model_type '{model_type}' in {source} is not supported; "
                f"chipspan supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        missing = [key for key in _REQUIRED_SIZES if raw.get(key) is None]
        if missing:
            raise ChipspanError(f"{source} lacks {', '.join(missing)}, needed for a {model_type} model")
        activation = raw.get("hidden_act", "silu")
        if activation not in _ACTIVATIONS:
            raise ChipspanError(f"hidden_act '{activation}' in {source} is not supported; expected silu")
        quantized = raw.get("quantization_config")
        if quantized is not None:
            method = quantized.get("quant_method") if isinstance(quantized, dict) else None
            raise ChipspanError(
                f"{source} is of a model quantized with {method or 'an unnamed method'} (quantization_config); "
                "chipspan reads 16- and 32-bit weights only: use the model it was quantized from"
            )
        sizes = {key: _size(raw, key, source) for key in _SIZES}
        heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
        head_dim = sizes["head_dim"] or _head_dim(hidden, heads, source)
        kv_heads = sizes["num_key_value_heads"] or heads
        if heads % kv_heads:
            raise ChipspanError(
                f"num_key_value_heads {kv_heads} in {source} does not divide num_attention_heads "
                f"{heads}: each key/value head serves a whole group of query heads"
            )
        if head_dim % 2:
            raise ChipspanError(
                f"head_dim {head_dim} in {source} is odd: rotary embeddings rotate pairs of "
                "dimensions, so it must be even"
            )

        rope_scaling = _read_rope_scaling(raw, source)
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = _flag(raw, "attention_bias", source)
            mlp_bias = _flag(raw, "mlp_bias", source)
        sliding = sizes["sliding_window"] if model_type != "llama" else None
        if model_type == "qwen2" and not _flag(raw, "use_sliding_window", source):
            sliding = None
        return cls(
            model_type=model_type,
            vocab_size=sizes["vocab_size"],
            hidden_size=hidden,
            intermediate_size=sizes["intermediate_size"],
            num_hidden_layers=sizes["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_positive_number(raw.get("rms_norm_eps", 1e-6), "rms_norm_eps", source),
            rope_theta=_read_rope_theta(raw, source),
            rope_scaling=rope_scaling,
            max_position_embeddings=sizes["max_position_embeddings"] or 2048,
            tie_word_embeddings=_flag(raw, "tie_word_embeddings", source),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=sliding,
            bos_token_id=_token_ids(raw, "bos_token_id", source, several=False),
            eos_token_id=_token_ids(raw, "eos_token_id", source, several=True),
            pad_token_id=_token_ids(raw, "pad_token_id", source, several=False),
            torch_dtype=_text(raw, "torch_dtype", source) or _text(raw, "dtype", source),
            raw=dict(raw),
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` from a model folder (or a path to the file itself)."""
        path = Path(path)
        file = path if path.is_file() else path / "config.json"
        if not path.exists():
            raise ChipspanError(f"model path {path} does not exist; pass a folder holding config.json")
        if not file.is_file():
            raise ChipspanError(f"{path} holds no config.json; is it a Hugging Face model folder?")
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise ChipspanError(
                f"{file} is {file.stat().st_size:,} bytes; a model's config.json is a few kB "
                f"(chipspan reads at most {MAX_CONFIG_BYTES:,}): is it the right file?"
            )
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise ChipspanError(f"{file} is not valid JSON: {' '.join(str(exc).split())[:200]}") from None
        if not isinstance(raw, dict):
            raise ChipspanError(f"{file} must hold a JSON object (name -> value), not a {type(raw).__name__}")
        return cls.from_dict(raw, source=str(file))


def _size(raw: dict[str, Any], key: str, source: str) -> int | None:
    """``raw[key]`` as a whole number from 1 to its limit in ``_SIZES``; None when absent (or null)."""
    value = raw.get(key)
    if value is None:
        return None
    limit = _SIZES[key]
    if not _is_int(value) or not 1 <= value <= limit:
        raise ChipspanError(
            f"{key} in {source} must be a whole number from 1 to {limit:,}, not {_shown(value)}: fix the config"
        )
    return value


def _head_dim(hidden: int, heads: int, source: str) -> int:
    if hidden % heads:
        raise ChipspanError(
            f"num_attention_heads {heads} in {source} does not divide hidden_size {hidden}: "
            "fix one, or give head_dim explicitly"
        )
    return hidden // heads


def _positive_number(value: Any, key: str, source: str) -> float:
    """``value`` as a finite float > 0, else ChipspanError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ChipspanError(f"{key} in {source} must be a finite number > 0, not {_shown(value)}: fix the config")
    return float(value)


def _flag(raw: dict[str, Any], key: str, source: str) -> bool:
    value = raw.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ChipspanError(f"{key} in {source} must be true or false, not {_shown(value)}")
    return value


def _token_ids(raw: dict[str, Any], key: str, source: str, several: bool) -> int | list[int] | None:
    """A token id (a whole number; some configs write -1 for none), None, or with ``several`` a list of them."""
    value = raw.get(key)
    ids = value if several and isinstance(value, list) else [value]
    if value is not None and not all(_is_int(i) for i in ids):
        kind = "a token id (a whole number) or a list of them" if several else "a token id (a whole number)"
        raise ChipspanError(f"{key} in {source} must be {kind}, not {_shown(value)}")
    return value


def _text(raw: dict[str, Any], key: str, source: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise ChipspanError(f'{key} in {source} must be a string such as "bfloat16", not {_shown(value)}')
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """``value`` as JSON writes it (a string in quotes), cut short."""
    return shown(json.dumps(value))


def _mapping(raw: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    """``raw[key]`` as a JSON object; {} when absent, null or empty."""
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ChipspanError(f"{key} in {source} must be a JSON object (or null), not {_shown(value)}")
    return value


def _read_rope_theta(raw: dict[str, Any], source: str) -> float:
    theta = raw.get("rope_theta")
    if theta is None:
        theta = _mapping(raw, "rope_parameters", source).get("rope_theta", 10000.0)
    return _positive_number(theta, "rope_theta", source)


def _read_rope_scaling(raw: dict[str, Any], source: str) -> dict[str, Any] | None:
    key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    scaling = _mapping(raw, key, source)
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ChipspanError(
            f"rope_scaling type {_shown(rope_type)} in {source} is not supported; "
            f"chipspan supports: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return None
    if "factor" not in scaling:
        raise ChipspanError(f"rope_scaling of type '{rope_type}' in {source} needs a 'factor'")
    _positive_number(scaling["factor"], f"{key}.factor", source)
    if rope_type == "llama3":
        low = _positive_number(scaling.get("low_freq_factor", 1.0), f"{key}.low_freq_factor", source)
        high = _positive_number(scaling.get("high_freq_factor", 4.0), f"{key}.high_freq_factor", source)
        if high <= low:
            raise ChipspanError(
                f"{key} in {source}: high_freq_factor ({high:g}) must be above low_freq_factor ({low:g})"
            )
        context = scaling.get("original_max_position_embeddings", 1)
        if not _is_int(context) or context < 1:
            raise ChipspanError(
                f"{key}.original_max_position_embeddings in {source} must be a whole number >= 1, not {_shown(context)}"
            )
    return dict(scaling)
