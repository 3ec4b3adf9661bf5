"""What trains on this rank's stages, with the same initial adapter a single process would draw.

``prepare_trainable`` draws new LoRA weights in layer order on the CPU generator. A rank that holds
layers 8-15 has not drawn those of layers 0-7, so before each of its pieces it makes the draws of the
layers held elsewhere — LoRA layers with no base weights, thrown away — and LLaMA-Factory 0.5 then gives
the adapter a single process gives, whatever the split.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from chipspan.adapters.lora import LoraLinear
from chipspan.args import FinetuningArguments
from chipspan.models.config import ModelConfig
from chipspan.models.decoder import CausalLM
from chipspan.train.finetune import add_new_lora, prepare_trainable


def prepare_stages(
    pieces: list[CausalLM],
    config: ModelConfig,
    args: FinetuningArguments,
    adapter: str | None,
    trained_dtype: torch.dtype = torch.float32,
) -> None:
    """Mark what trains on ``pieces`` (this rank's stages, in order) as ``prepare_trainable`` does for
    the whole model; a new adapter gets the weights the whole model would get."""
    drawn = 0  # layers whose LoRA weights the CPU generator has drawn
    for piece in pieces:
        layers = piece.layer_indices
        if args.finetuning_type == "lora" and not adapter and layers:
            _draw_like_lora(config, range(drawn, layers[0]), args)
            drawn = layers[-1] + 1
        prepare_trainable([piece], args, adapter=adapter, trained_dtype=trained_dtype)


def _draw_like_lora(config: ModelConfig, layers: range, args: FinetuningArguments) -> None:
    """Advance the CPU generator as injecting LoRA into ``layers`` would, without their base weights."""
    if not layers:
        return
    with torch.device("meta"):
        skipped = CausalLM(config, layers=layers, embed=False, head=False)
    for name in add_new_lora(skipped, args):
        meta = skipped.get_submodule(name)
        weightless = SimpleNamespace(
            in_features=meta.in_features, out_features=meta.out_features, weight=torch.empty(0), bias=None
        )
        LoraLinear(weightless, args.lora_rank, 1.0)
