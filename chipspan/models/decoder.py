"""The Llama-family decoder, read top to bottom.

    input_ids (b, s) -> embed_tokens -> layers[i] ... -> norm -> lm_head -> logits (b, s, vocab)

Each decoder layer is ``x + attn(rms_norm(x))`` then ``x + mlp(rms_norm(x))``, with rotary
position embeddings, grouped-query attention through ``scaled_dot_product_attention`` and a SwiGLU
MLP. Parameter names equal Hugging Face's (``model.layers.3.self_attn.q_proj.weight``), so
HF weight files load and save without renaming.

A ``CausalLM`` may hold only part of the model — any subset of layers, with or without the
embeddings and the head — and still use global layer indices. That is how a slice is placed on one
chip: ``embed`` / ``run_layers`` / ``loss`` are the pieces a pipeline stage calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from chipspan.devices import index_dtype
from chipspan.models.config import ModelConfig
from chipspan.models.loss import ScoredTokens, causal_lm_loss


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled by a learned weight (hidden,)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# --- rotary position embeddings ------------------------------------------------------------------


def rope_inverse_frequencies(config: ModelConfig, seq_len: int) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in fp32, after the config's ``rope_scaling``.

    ``seq_len`` (longest position + 1) matters only for ``dynamic`` scaling, which raises the
    base once a sequence outgrows ``max_position_embeddings``.
    """
    dim = config.head_dim
    base = config.rope_theta
    scaling = config.rope_scaling or {}
    rope_type = config.rope_type
    if rope_type == "dynamic" and seq_len > config.max_position_embeddings:
        factor = scaling["factor"]
        ratio = factor * seq_len / config.max_position_embeddings - (factor - 1)
        base = base * ratio ** (dim / (dim - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_frequencies(inv_freq, scaling, config.max_position_embeddings)
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict, max_positions: int) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short ones kept, a smooth ramp between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", max_positions)
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    in_between = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return torch.where(in_between, ramp, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (b, heads, s, head_dim) by the angles whose cos/sin are (b, s, head_dim)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


# --- attention -----------------------------------------------------------------------------------


class KVCache:
    """Keys and values of past positions, per layer: (b, kv_heads, past, head_dim) each."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    @property
    def length(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values for ``layer`` and return all of them."""
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        h, q, kv = config.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_proj = nn.Linear(h, q, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, kv, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, kv, bias=config.attention_bias)
        self.o_proj = nn.Linear(q, h, bias=config.o_proj_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        """x (b, s, hidden); mask: None for plain causal, else bool (b, 1, s, past + s), True = attend."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(self.layer_index, k, v)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and s > 1,
            enable_gqa=self.kv_heads != self.heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# --- the model -----------------------------------------------------------------------------------


class Body(nn.Module):
    """HF's ``model.*``: embeddings, the decoder layers held here (keyed by global index), final norm."""

    def __init__(self, config: ModelConfig, layers: Iterable[int], embed: bool, norm: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if embed else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i) for i in sorted(layers)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if norm else None


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # (b, s, vocab) in the model's dtype
    loss: torch.Tensor | None  # scalar fp32: mean cross-entropy over labels != -100


class CausalLM(nn.Module):
    """A decoder-only language model, or a contiguous part of one.

    Args:
        config: the model's shape.
        layers: global indices of the decoder layers held here (default: all).
        embed: hold the token embeddings (the first stage).
        head: hold the final norm and the LM head (the last stage).
    """

    def __init__(self, config: ModelConfig, layers: Iterable[int] | None = None, embed: bool = True, head: bool = True):
        super().__init__()
        self.config = config
        layers = range(config.num_hidden_layers) if layers is None else layers
        self.model = Body(config, layers, embed=embed, norm=head)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if head else None
        self.gradient_checkpointing = False
        self.tie_weights()

    @property
    def layer_indices(self) -> list[int]:
        return [int(i) for i in self.model.layers]

    def tie_weights(self) -> None:
        """Share one matrix between embeddings and head when the config ties them and both are here."""
        if self.config.tie_word_embeddings and self.model.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- the pieces a pipeline stage runs --

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (b, s) -> hidden states (b, s, hidden)."""
        return self.model.embed_tokens(input_ids)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (b, s, head_dim) in ``dtype`` for integer positions (b, s)."""
        seq_len = int(position_ids.max()) + 1 if self.config.rope_type == "dynamic" else 0
        inv_freq = rope_inverse_frequencies(self.config, seq_len).to(position_ids.device)
        angles = position_ids.float().unsqueeze(-1) * inv_freq  # (b, s, head_dim/2)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def run_layers(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Run the layers held here, in order, on hidden (b, s, hidden).

        ``mask`` is None for plain causal attention, or bool (b, 1, s, past + s), True = attend
        (see ``build_attention_mask``); position_ids (b, s) place each token for the rotary embeddings.
        """
        cos, sin = self.rope(position_ids, hidden.dtype)
        for layer in self.model.layers.values():
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, cos, sin, mask, cache, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, mask, cache)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head: hidden (b, s, hidden) -> logits (b, s, vocab)."""
        return self.lm_head(self.model.norm(hidden))

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor | ScoredTokens, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy of hidden (b, s, hidden) against labels (b, s), -100 ignored, or
        their ``ScoredTokens``."""
        return causal_lm_loss(self.model.norm(hidden), self.lm_head.weight, labels, reduction=reduction)

    # -- the whole model in one call --

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_logits: bool = True,
    ) -> CausalLMOutput:
        """input_ids/labels (b, s); attention_mask (b, past + s): 0 = padding, 1 = real token, or
        segment ids 1, 2, 3, … for packed examples (see ``build_attention_mask``)."""
        b, s = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, b, s, past, input_ids.device)
        mask = build_attention_mask(attention_mask, s, past, input_ids.device)
        hidden = self.run_layers(self.embed(input_ids), position_ids, mask, cache)
        loss = self.loss(hidden, labels) if labels is not None else None
        logits = self.logits(hidden) if return_logits else None
        return CausalLMOutput(logits=logits, loss=loss)


def build_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past: int, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """A bool (b, 1, q_len, past + q_len) mask, True = attend, or None when plain causal suffices.

    ``attention_mask`` (b, past + q_len) marks real tokens with 1 and padding with 0; padding keys
    are hidden, and a padding query attends to itself too, so its row stays finite (it is never
    trained on). Packed rows number their examples 1, 2, 3, … instead: a token then attends only
    to earlier tokens of its own example (block-diagonal causal), padding only to earlier padding.
    """
    lowest, highest = (1, 1) if attention_mask is None else torch.stack(torch.aminmax(attention_mask)).tolist()
    if lowest == highest == 1:
        if past == 0 or q_len == 1:
            return None
        attention_mask = None
    kv_len = past + q_len  # int32 positions: a chip without int64 builds the mask too
    q_pos = torch.arange(past, kv_len, dtype=torch.int32, device=device).unsqueeze(1)
    k_pos = torch.arange(kv_len, dtype=torch.int32, device=device).unsqueeze(0)
    mask = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0)  # (1, 1, q, kv)
    if attention_mask is None:
        return mask
    if highest > 1:
        return mask & (attention_mask[:, None, past:, None] == attention_mask[:, None, None, :])
    return mask & attention_mask.bool()[:, None, None, :] | (k_pos == q_pos)


def default_position_ids(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, past: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Positions (b, q_len) of the new tokens: past, past + 1, …, restarting at 0 at the first
    token of each packed example when ``attention_mask`` (b, past + q_len) holds segment ids.
    Counted where the mask is (the host without one) and delivered on ``device`` in its index
    dtype (int32 where a chip cannot hold int64).

    Padding continues the count, as in an unpacked row; under ``dynamic`` rope, whose base follows
    the batch's largest position, a packed row's trailing padding can therefore still raise it.
    """
    if attention_mask is None:
        positions = (past + torch.arange(q_len)).unsqueeze(0).expand(batch, -1)
    else:
        positions = segment_positions(attention_mask)[:, past:]
    return positions.to(device, index_dtype(device))


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions (b, n) counted from the start of each segment of ``segment_ids`` (b, n).

    A segment starts where a nonzero id follows a different nonzero id; padding (0) does not start
    one, so a plain 0/1 mask, padded on either side, gives 0, 1, 2, … like an unpacked row.
    """
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    previous = F.pad(segment_ids[:, :-1], (1, 0))
    starts = (segment_ids != previous) & (segment_ids != 0) & (previous != 0)
    return index - torch.where(starts, index, 0).cummax(dim=1).values
