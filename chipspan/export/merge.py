"""A base model with its adapters merged, written part by part: never the whole model in memory.

A *part* is the embeddings, one decoder layer, or the final norm with the head. Each is loaded in
fp32, has every adapter merged into it in order (in fp32), is cast to the export dtype and goes into
the shard being filled; a shard is written as soon as it is full. Shards are planned from the
tensors' shapes before anything loads, so the peak is one part in fp32 plus one shard.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from chipspan.adapters.peft_io import load_adapters
from chipspan.models.config import ModelConfig
from chipspan.models.decoder import CausalLM
from chipspan.models.weights import load_pretrained, model_state_dict, write_safetensors


@dataclass(frozen=True)
class Part:
    """Which slice of the model one step loads (the keywords of ``CausalLM``)."""

    layers: tuple[int, ...]
    embed: bool
    head: bool


def parts(config: ModelConfig) -> list[Part]:
    """The embeddings, each layer, then the final norm and head, in HF's key order."""
    layers = [Part((i,), False, False) for i in range(config.num_hidden_layers)]
    return [Part((), True, False), *layers, Part((), False, True)]


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor an export writes, in the order :func:`merged_parts` gives them (read
    from a meta model: nothing loads)."""
    shapes = {}
    for part in parts(config):
        with torch.device("meta"):
            model = CausalLM(config, layers=part.layers, embed=part.embed, head=part.head)
        shapes.update({name: tuple(t.shape) for name, t in model_state_dict(model).items()})
    return shapes


def tensor_bytes(config: ModelConfig, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of each tensor the export writes in ``dtype``, in write order."""
    return {name: math.prod(shape) * dtype.itemsize for name, shape in tensor_shapes(config).items()}


def shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in write order: a shard takes tensors until the next would pass
    ``max_shard_bytes`` (a tensor larger than that gets a shard of its own), as transformers shards."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def write_merged(
    base: Path,
    adapters: list[Path],
    out: Path,
    dtype: torch.dtype,
    max_shard_bytes: int,
    legacy: bool = False,
    device: str | torch.device = "cpu",
) -> list[Path]:
    """Write ``base`` with ``adapters`` merged (in order) into folder ``out`` as HF weights in
    ``dtype``: safetensors (``legacy``: pytorch_model*.bin), sharded by ``max_shard_bytes`` with an
    index when more than one; returns the weight files. Merging runs on ``device``."""
    sizes = tensor_bytes(ModelConfig.from_folder(base), dtype)
    plan = shard_plan(sizes, max_shard_bytes)
    names = _file_names(len(plan), legacy)
    shard_of = {name: i for i, shard in enumerate(plan) for name in shard}
    pending: dict[str, torch.Tensor] = {}
    written = 0
    for tensors in merged_parts(base, adapters, dtype, device):
        pending.update(tensors)
        while written < len(plan) and all(name in pending for name in plan[written]):
            _write_shard({name: pending.pop(name) for name in plan[written]}, out / names[written], legacy)
            written += 1
    leftover = sorted(pending) + [name for shard in plan[written:] for name in shard]
    if leftover:
        raise AssertionError(f"export planned and produced different tensors: {leftover[:3]}")
    if len(plan) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {n: names[i] for n, i in shard_of.items()},
        }
        index_name = "pytorch_model.bin.index.json" if legacy else "model.safetensors.index.json"
        (out / index_name).write_text(json.dumps(index, indent=2) + "\n")
    return [out / name for name in names]


def merged_parts(
    base: Path, adapters: list[Path], dtype: torch.dtype, device: str | torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Each part's HF-named tensors, merged and cast to ``dtype``, on the CPU (one part in fp32 at a time)."""
    config = ModelConfig.from_folder(base)
    for part in parts(config):
        model = load_pretrained(base, torch.float32, device, layers=part.layers, embed=part.embed, head=part.head)
        with torch.no_grad():
            load_adapters(model, adapters, keep_last=False)
            yield {name: t.detach().to("cpu", dtype).contiguous() for name, t in model_state_dict(model).items()}
        del model


def _file_names(count: int, legacy: bool) -> list[str]:
    stem, suffix = ("pytorch_model", "bin") if legacy else ("model", "safetensors")
    if count == 1:
        return [f"{stem}.{suffix}"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.{suffix}" for i in range(count)]


def _write_shard(tensors: dict[str, torch.Tensor], path: Path, legacy: bool) -> None:
    if legacy:
        torch.save(tensors, path)
    else:
        write_safetensors(tensors, path)
