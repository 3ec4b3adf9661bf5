"""Token generation with a KV cache: greedy, or sampled with temperature / top-k / top-p."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from chipspan.devices import index_dtype
from chipspan.models.decoder import CausalLM, KVCache


@dataclass
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int | None = None


@torch.no_grad()
def generate(
    model: CausalLM,
    prompt_ids: list[int],
    stop_ids: Iterable[int],
    settings: SamplingSettings | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Continue ``prompt_ids`` until a stop id or ``max_new_tokens``; returns the new ids (stop id excluded)."""
    settings = settings or SamplingSettings()
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    device = next(model.parameters()).device
    index = index_dtype(device)
    # a chip without int64 cannot hold argmax's or multinomial's answer: it picks on the host
    picks_on = device if index == torch.int64 else torch.device("cpu")
    stop = set(stop_ids)
    generator = torch.Generator(device=picks_on).manual_seed(settings.seed) if settings.seed is not None else None
    cache = KVCache()
    step_input = torch.tensor([prompt_ids], dtype=index, device=device)
    new_ids: list[int] = []
    model.eval()
    for _ in range(settings.max_new_tokens):
        logits = model(step_input, cache=cache).logits[0, -1].float().to(picks_on)  # (vocab,)
        token = _pick(logits, settings, generator)
        if token in stop:
            break
        new_ids.append(token)
        if on_token is not None:
            on_token(token)
        step_input = torch.tensor([[token]], dtype=index, device=device)
    return new_ids


def _pick(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> int:
    """Next token from fp32 logits (vocab,)."""
    if settings.temperature <= 0:
        return int(logits.argmax())
    logits = logits / settings.temperature
    if settings.top_k > 0:
        kth = torch.topk(logits, min(settings.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= settings.top_p  # keep the token crossing top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
