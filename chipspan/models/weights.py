"""Hugging Face model weights in and out: safetensors (single or sharded) and, read-only, pytorch_model*.bin.

Loading builds the model on the ``meta`` device (no memory), then reads the weight files tensor by
tensor straight into the target dtype and device, so the weights never exist twice. A model that
holds only some layers (one pipeline stage) reads only those tensors. With quantization settings,
each linear layer of the decoder layers is quantized on its chip as its weight arrives (one tensor
in full precision at a time) and becomes a ``QuantizedLinear``; embeddings, norms and the head keep
the load dtype.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig
from chipspan.models.decoder import CausalLM
from chipspan.quant import QuantizedLinear, QuantSettings

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
LAYERS_PREFIX = "model.layers."
# Buffers some weight files carry that this model computes instead.
_IGNORED_KEYS = re.compile(r".*\.rotary_emb\.inv_freq$")
_UMASK = os.umask(0o022)  # read it (os has no getter) and put it back
os.umask(_UMASK)


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    layers: Iterable[int] | None = None,
    embed: bool = True,
    head: bool = True,
    quant: QuantSettings | None = None,
) -> CausalLM:
    """Build a CausalLM (or the slice given by layers/embed/head) from an HF model folder; with
    ``quant``, its decoder layers' linear layers quantized as they load."""
    config = ModelConfig.from_folder(path)
    with torch.device("meta"):
        model = CausalLM(config, layers=layers, embed=embed, head=head)
    load_weights(model, Path(path), dtype=dtype, device=device, quant=quant)
    return model


def weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF model folder, safetensors preferred over .bin."""
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        if (folder / index_name).is_file():
            index = _read_json(folder / index_name)
            names = sorted(set(index.get("weight_map", {}).values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise ChipspanError(
                    f"{folder / index_name} lists {missing[0]}, which is not in {folder}; download the missing shards"
                )
            return [folder / n for n in names]
        if (folder / single).is_file():
            return [folder / single]
    raise ChipspanError(
        f"no model weights in {folder}: expected model.safetensors, "
        f"{SAFETENSORS_INDEX} with its shards, or pytorch_model.bin"
    )


def load_weights(
    model: CausalLM,
    folder: Path,
    dtype: torch.dtype,
    device: str | torch.device,
    quant: QuantSettings | None = None,
) -> None:
    """Fill every parameter of ``model`` from the weight files in the model folder ``folder``; with
    ``quant``, each decoder-layer linear becomes a ``QuantizedLinear`` as its weight arrives.

    Raises ChipspanError naming the first few missing, unexpected or mis-shaped keys.
    """
    wanted = _parameters_by_key(model)  # weight key -> names of the model's parameters
    quantized = {f"{name}.weight": name for name in decoder_linears(model)} if quant else {}
    expected = _full_model_shapes(model.config)
    loaded: set[str] = set()
    unexpected, mismatched = [], []
    for file in weight_files(folder):
        with _open_tensors(file) as (keys, get):
            for key in keys:
                if _IGNORED_KEYS.match(key):
                    continue
                if key not in expected:
                    unexpected.append(key)
                    continue
                if key not in wanted:
                    continue  # a part of the model that another stage holds
                tensor = get(key)
                if tuple(tensor.shape) != expected[key]:
                    mismatched.append(f"{key} {tuple(tensor.shape)} vs {expected[key]}")
                    continue
                tensor = tensor.to(device=device, dtype=dtype)
                if key in quantized:
                    _quantize_module(model, quantized[key], tensor, quant)
                else:
                    for name in wanted[key]:
                        _set_parameter(model, name, tensor)
                del tensor  # a weight being quantized is the only full-precision one on the chip
                loaded.add(key)
    missing = [key for key in wanted if key not in loaded]
    for problem, keys in (("shape mismatch", mismatched), ("unexpected keys", unexpected), ("missing keys", missing)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise ChipspanError(
                f"the weights in {folder} do not fit a {model.config.model_type} model "
                f"of this config — {problem}: {', '.join(keys[:3])}{more}"
            )
    model.tie_weights()


def decoder_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules inside the decoder layers: what a quantized base quantizes."""
    return [name for name, m in model.named_modules() if name.startswith(LAYERS_PREFIX) and isinstance(m, nn.Linear)]


def quantize_decoder_linears(model: nn.Module, quant: QuantSettings) -> None:
    """Quantize every decoder-layer linear of a built ``model`` in place (each on its own device)."""
    for name in decoder_linears(model):
        module = model.get_submodule(name)
        _quantize_module(model, name, module.weight.detach(), quant)


def remove_weights(folder: Path, prefix: str = "model") -> None:
    """Delete the safetensors weights an earlier save left in ``folder`` (one file, or shards and their
    index), so that no loader mixes them with new ones: an old index wins over a new single file."""
    for path in [
        folder / f"{prefix}.safetensors",
        folder / f"{prefix}.safetensors.index.json",
        *folder.glob(f"{prefix}-*-of-*.safetensors"),
    ]:
        path.unlink(missing_ok=True)


def save_weights(
    state_dict: dict[str, torch.Tensor], folder: str | Path, max_shard_size: int | str = "5GB", prefix: str = "model"
) -> list[Path]:
    """Write tensors as HF safetensors: ``model.safetensors``, or ``model-0000k-of-0000n.safetensors``
    shards plus ``model.safetensors.index.json`` when they exceed ``max_shard_size`` (bytes or "5GB")."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_weights(folder, prefix)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
    if len(shards) == 1:
        names = [f"{prefix}.safetensors"]
    else:
        names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors({k: t.detach().to("cpu").contiguous() for k, t in shard.items()}, folder / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [folder / n for n in names]


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file of CPU tensors, readable as the umask allows (safetensors itself writes
    it for its owner only, which a server running as another user cannot read)."""
    save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_UMASK)


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-named tensors of a model, with a tied head written once (as the embeddings)."""
    state = model.state_dict()
    if getattr(model, "config", None) is not None and model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ChipspanError(f"cannot read size '{size}'; write it like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(number * base ** "BKMGT".index(unit[0]))


# --- helpers -------------------------------------------------------------------------------------


def _parameters_by_key(model: CausalLM) -> dict[str, list[str]]:
    """Map each weight key this model needs to the parameter names it fills."""
    names: dict[str, list[str]] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        key = name
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            key = "model.embed_tokens.weight"
        names.setdefault(key, []).append(name)
    return names


def _full_model_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        full = CausalLM(config)
    return {
        name: tuple(p.shape)
        for name, p in full.named_parameters(remove_duplicate=False)
        if not (name == "lm_head.weight" and config.tie_word_embeddings)
    }


def _quantize_module(model: nn.Module, name: str, weight: torch.Tensor, quant: QuantSettings) -> None:
    """Put a ``QuantizedLinear`` of ``weight`` (out, in) in place of the linear module ``name``,
    keeping its bias (loaded already, or still on ``meta`` until its key comes)."""
    parent, _, child = name.rpartition(".")
    bias = model.get_submodule(name).bias
    setattr(model.get_submodule(parent), child, QuantizedLinear.from_weight(weight, bias, quant))


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters[attr]
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)


@contextmanager
def _open_tensors(file: Path) -> Iterator[tuple[list[str], Callable[[str], torch.Tensor]]]:
    """(keys, get(key) -> tensor) over one weight file, read lazily where the format allows."""
    if file.suffix == ".safetensors":
        try:
            with safe_open(file, framework="pt", device="cpu") as handle:
                yield list(handle.keys()), handle.get_tensor
        except SafetensorError as exc:
            raise ChipspanError(
                f"{file} is not a readable safetensors file ({exc}); it may be truncated — download it again"
            ) from None
        return
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise ChipspanError(
            f"{file} is not a readable PyTorch weights file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); download it again"
        ) from None
    yield list(state.keys()), state.__getitem__


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ChipspanError(f"cannot read {file}: {exc}") from None
