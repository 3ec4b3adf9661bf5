"""Token generation with a KV cache: greedy, or sampled with temperature / top-k / top-p, with
transformers' repetition penalty."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from chipspan.args import GeneratingArguments
from chipspan.devices import index_dtype
from chipspan.errors import ChipspanError
from chipspan.models.decoder import CausalLM, KVCache


@dataclass
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # 1 = none; > 1 makes every token already in the sequence less likely


def sampling_settings(flags: GeneratingArguments, seed: int | None = None) -> SamplingSettings:
    """LLaMA-Factory's generating flags as sampler settings: greedy without --do_sample; beam
    search refused. One reading for chat, api and --do_predict."""
    if flags.num_beams != 1:
        raise ChipspanError(f"--num_beams {flags.num_beams}: beam search is not supported; use --num_beams 1")
    return SamplingSettings(
        max_new_tokens=flags.max_new_tokens,
        temperature=flags.temperature if flags.do_sample else 0.0,
        top_k=flags.top_k,
        top_p=flags.top_p,
        seed=seed,
        repetition_penalty=flags.repetition_penalty,
    )


@torch.no_grad()
def generate(
    model: CausalLM,
    prompt_ids: list[int],
    stop_ids: Iterable[int],
    settings: SamplingSettings | None = None,
    on_token: Callable[[int], None] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue ``prompt_ids`` until a stop id or ``max_new_tokens``; returns the new ids (stop id excluded).

    Sampling draws from ``generator`` when given (on :func:`picking_device`), else from one seeded
    with ``settings.seed``, else from torch's global generator. ``on_token`` may raise to stop early.
    """
    settings = settings or SamplingSettings()
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    device = next(model.parameters()).device
    index = index_dtype(device)
    picks_on = picking_device(device)
    stop = set(stop_ids)
    if generator is None and settings.seed is not None:
        generator = torch.Generator(device=picks_on).manual_seed(settings.seed)
    seen = torch.tensor(sorted(set(prompt_ids)), dtype=torch.int64, device=picks_on)
    cache = KVCache()
    step_input = torch.tensor([prompt_ids], dtype=index, device=device)
    new_ids: list[int] = []
    model.eval()
    for _ in range(settings.max_new_tokens):
        logits = model(step_input, cache=cache).logits[0, -1].float().to(picks_on)  # (vocab,)
        if settings.repetition_penalty != 1.0:
            logits = penalize_repetition(logits, seen, settings.repetition_penalty)
        token = _pick(logits, settings, generator)
        if token in stop:
            break
        new_ids.append(token)
        if on_token is not None:
            on_token(token)
        if settings.repetition_penalty != 1.0:
            seen = torch.cat([seen, torch.tensor([token], dtype=torch.int64, device=picks_on)])
        step_input = torch.tensor([[token]], dtype=index, device=device)
    return new_ids


def picking_device(device: torch.device) -> torch.device:
    """Where the next token is picked: the model's last chip, or the host for a chip without int64
    (which cannot hold argmax's or multinomial's answer)."""
    return device if index_dtype(device) == torch.int64 else torch.device("cpu")


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor on fp32 logits (vocab,): the logit of every id
    in ``seen`` (the prompt and the answer so far) divided by ``penalty`` where positive, multiplied
    where negative."""
    scores = logits.gather(0, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen, scores)


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
