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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chipspan.errors import ChipspanError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_ACTIVATIONS = ("silu", "swish")


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
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Validate an HF config dict; raise ChipspanError naming the first problem."""
        model_type = raw.get("model_type")
        if model_type is None:
            raise ChipspanError(
                f"{source} has no 'model_type'; add one of: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ChipspanError(
                f"model_type '{model_type}' in {source} is not supported; "
                f"chipspan supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [key for key in required if raw.get(key) is None]
        if missing:
            raise ChipspanError(f"{source} lacks {', '.join(missing)}, needed for a {model_type} model")
        activation = raw.get("hidden_act", "silu")
        if activation not in _ACTIVATIONS:
            raise ChipspanError(f"hidden_act '{activation}' in {source} is not supported; expected silu")

        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        rope_scaling = _read_rope_scaling(raw, source)
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = bool(raw.get("attention_bias", False))
            mlp_bias = bool(raw.get("mlp_bias", False))
        sliding = raw.get("sliding_window") if model_type != "llama" else None
        if model_type == "qwen2" and not raw.get("use_sliding_window", False):
            sliding = None
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=_read_rope_theta(raw),
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=sliding,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            raw=dict(raw),
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> "ModelConfig":
        """Read ``config.json`` from a model folder (or a path to the file itself)."""
        path = Path(path)
        file = path if path.is_file() else path / "config.json"
        if not path.exists():
            raise ChipspanError(f"model path {path} does not exist; pass a folder holding config.json")
        if not file.is_file():
            raise ChipspanError(f"{path} holds no config.json; is it a Hugging Face model folder?")
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ChipspanError(f"{file} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ChipspanError(f"{file} must hold a JSON object")
        return cls.from_dict(raw, source=str(file))


def _read_rope_theta(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters") or {}
    return float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _read_rope_scaling(raw: dict[str, Any], source: str) -> dict[str, Any] | None:
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ChipspanError(
            f"rope_scaling type '{rope_type}' in {source} is not supported; "
            f"chipspan supports: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return None
    if rope_type in ("linear", "dynamic", "llama3") and "factor" not in scaling:
        raise ChipspanError(f"rope_scaling of type '{rope_type}' in {source} needs a 'factor'")
    return dict(scaling)
