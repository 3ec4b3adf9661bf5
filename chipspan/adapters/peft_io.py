"""LoRA adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's, so transformers + PEFT load what we write and we load what they write:

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   (out, r)
    base_model.model.lm_head.weight                                  an additional target (modules_to_save)

A pipeline stage (a CausalLM holding some layers) reads and writes only the keys of the modules it
holds; ``adapter_state_dict`` of every stage, merged, is the whole adapter.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from chipspan.adapters.lora import (
    LoraSettings,
    additional_modules,
    apply_lora,
    lora_layers,
    merge_and_unload,
    ties_trained_embeddings,
)
from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig
from chipspan.models.decoder import CausalLM
from chipspan.models.weights import write_safetensors

try:
    from re import _parser as _regex_parser  # Python 3.11+
except ImportError:  # Python 3.10
    import sre_parse as _regex_parser

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # what PEFT wrote before safetensors
PREFIX = "base_model.model."

# The other fields PEFT 0.21 writes, each with the value that means plain LoRA.
_NEUTRAL_FIELDS = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "bias": "none",
    "corda_config": None,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_bias": False,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "monteclora_config": None,
    "qalora_group_size": 16,
    "rank_pattern": {},
    "revision": None,
    "target_parameters": None,
    "task_type": "CAUSAL_LM",
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "velora_config": None,
}
# Fields that change what an adapter computes: only their neutral value loads here.
_UNSUPPORTED = (
    "alora_invocation_tokens",
    "alpha_pattern",
    "arrow_config",
    "bias",
    "exclude_modules",
    "fan_in_fan_out",
    "kasa_config",
    "layer_replication",
    "layers_pattern",
    "layers_to_transform",
    "lora_bias",
    "megatron_config",
    "monteclora_config",
    "rank_pattern",
    "target_parameters",
    "trainable_token_indices",
    "use_bdlora",
    "use_dora",
    "use_qalora",
    "velora_config",
)
_NEUTRAL_VALUES = (None, False, {}, [], "none")
# Initialisations that leave the base weights as they are (PiSSA, OLoRA, LoftQ, ... change them).
_PLAIN_INITS = (True, False, "gaussian", "orthogonal")
# A target_modules regex is matched against every module name: its size and repeats are bounded.
_MAX_PATTERN = 500
_MAX_REPEATS = 3
_REPEAT_OPS = tuple(
    getattr(_regex_parser, name)
    for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
    if hasattr(_regex_parser, name)
)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """PEFT key -> trained parameter, for what this model holds; a tied matrix appears under both keys."""
    _settings(model)
    params = {}
    for name, layer in lora_layers(model).items():
        params[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        params[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    held = dict(model.named_modules())
    for name in additional_modules(model, model.lora_settings):
        if name in held:
            for param_name, param in held[name].named_parameters():
                params[f"{PREFIX}{name}.{param_name}"] = param
    return params


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors this model holds, PEFT-keyed and detached (a shared one copied, as safetensors needs)."""
    tensors, seen = {}, set()
    for key, param in adapter_parameters(model).items():
        tensor = param.detach()
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[key] = tensor
    return tensors


def adapter_config(model: nn.Module, base_model_name_or_path: str | Path | None) -> dict:
    """The ``adapter_config.json`` content for the adapter on ``model``."""
    settings = _settings(model)
    target = settings.target_modules
    return {
        **_NEUTRAL_FIELDS,
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "ensure_weight_tying": ties_trained_embeddings(model),
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "modules_to_save": settings.modules_to_save,
        "peft_type": "LORA",
        "r": settings.r,
        "target_modules": target if isinstance(target, str) else sorted(target),
        "use_rslora": settings.use_rslora,
    }


def save_adapter(
    model: nn.Module,
    folder: str | Path,
    base_model_name_or_path: str | Path | None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``; returns the folder.

    ``state_dict`` (default: ``adapter_state_dict(model)``) lets a pipeline write the tensors
    gathered from all its stages, with ``model`` any one of them.
    """
    folder = Path(folder)
    config = adapter_config(model, base_model_name_or_path)
    tensors = adapter_state_dict(model) if state_dict is None else state_dict
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_safetensors({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, folder / ADAPTER_WEIGHTS)
    return folder


def read_adapter_config(folder: str | Path) -> LoraSettings:
    """The LoRA settings of a PEFT adapter folder; ChipspanError naming any field chipspan cannot honour
    or that has the wrong type (the file is untrusted)."""
    file = Path(folder) / ADAPTER_CONFIG
    if not file.is_file():
        raise ChipspanError(f"no {ADAPTER_CONFIG} in {folder}; point at a PEFT adapter folder")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ChipspanError(f"cannot read {file}: {' '.join(str(exc).split())[:200]}; re-save the adapter") from None
    if not isinstance(config, dict):
        raise ChipspanError(f"{file} holds a JSON {type(config).__name__}, not an object of LoRA settings")
    if config.get("peft_type") != "LORA":
        raise ChipspanError(
            f"{file} has peft_type {json.dumps(config.get('peft_type'))[:60]}; chipspan loads LORA adapters only"
        )
    for field in _UNSUPPORTED:
        value = config.get(field)
        if value not in _NEUTRAL_VALUES:
            raise ChipspanError(
                f"{file} sets {field} = {json.dumps(value)}, which chipspan does not support; "
                "only plain LoRA (optionally rsLoRA) adapters load"
            )
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ChipspanError(
            f"{file} sets init_lora_weights = {json.dumps(init)}, which changes the base weights; "
            "convert the adapter to plain LoRA with PEFT first"
        )
    return LoraSettings(
        target_modules=_field(
            file,
            config,
            "target_modules",
            None,
            _is_targets,
            f"a list of module names or a regex (at most {_MAX_PATTERN} characters and "
            f"{_MAX_REPEATS} repeats, none nested)",
        ),
        r=_field(file, config, "r", 8, _is_count, "a positive integer"),
        alpha=_field(file, config, "lora_alpha", 8, _is_positive, "a positive number"),
        dropout=_field(file, config, "lora_dropout", 0.0, _is_fraction, "a number in [0, 1)"),
        use_rslora=_field(file, config, "use_rslora", False, _is_flag, "true or false"),
        modules_to_save=_field(file, config, "modules_to_save", None, _is_names, "a list of module names") or None,
        keep_tied=_field(file, config, "ensure_weight_tying", False, _is_flag, "true or false"),
    )


def _field(file: Path, config: dict, key: str, default, valid: Callable[[object], bool], what: str):
    """``config[key]`` (``default`` when absent or null), or ChipspanError when it is not ``what``."""
    value = config.get(key)
    if value is None:
        value = default
    if not valid(value):
        shown = json.dumps(value)
        raise ChipspanError(f"{file}: {key} must be {what}, not {shown[:60]}{'...' if len(shown) > 60 else ''}")
    return list(value) if isinstance(value, list) else value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_positive(value: object) -> bool:
    return _is_number(value) and value > 0


def _is_fraction(value: object) -> bool:
    return _is_number(value) and 0 <= value < 1


def _is_flag(value: object) -> bool:
    return isinstance(value, bool)


def _is_names(value: object) -> bool:
    return value is None or isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _is_targets(value: object) -> bool:
    if isinstance(value, str):
        return _is_bounded_regex(value)
    return isinstance(value, list) and bool(value) and _is_names(value)


def _is_bounded_regex(pattern: str) -> bool:
    """Whether matching ``pattern`` against module names takes bounded work: it parses, is at most
    ``_MAX_PATTERN`` long, has at most ``_MAX_REPEATS`` repeats, and none inside another repeat or holding
    an alternation (those backtrack exponentially: ``(.*)*x`` runs for hours on one name)."""
    if not pattern or len(pattern) > _MAX_PATTERN:
        return False
    try:
        tree = _regex_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return False
    repeats = 0

    def bounded(items, in_repeat: bool) -> bool:
        nonlocal repeats
        for op, arg in items:
            if op in _REPEAT_OPS:
                many = arg[1] > 1
                if many and in_repeat:
                    return False
                repeats += many
                if not bounded(arg[2], in_repeat or many):
                    return False
            elif op == _regex_parser.BRANCH:
                if in_repeat or not all(bounded(branch, in_repeat) for branch in arg[1]):
                    return False
            elif op == _regex_parser.SUBPATTERN and not bounded(arg[3], in_repeat):
                return False
            elif op in (_regex_parser.ASSERT, _regex_parser.ASSERT_NOT) and not bounded(arg[1], in_repeat):
                return False
            elif op == _regex_parser.GROUPREF_EXISTS and not all(bounded(b or [], in_repeat) for b in arg[1:]):
                return False
        return True

    return bounded(tree, False) and repeats <= _MAX_REPEATS


def check_adapter(config: ModelConfig, folder: str | Path) -> LoraSettings:
    """Read an adapter's settings and check them, and its weights' names and shapes, against the model,
    before any weight is read."""
    folder = Path(folder)
    settings = read_adapter_config(folder)
    model = _with_lora(config, settings, folder)  # the module names first: no weight file is opened
    with _open_adapter(folder) as (shapes, _):
        _check_fit(model, settings, shapes, folder)
    return settings


def load_adapter(model: CausalLM, folder: str | Path) -> list[str]:
    """Add the PEFT adapter in ``folder`` to ``model`` (all of it, or one stage's part); returns the wrapped names.

    The adapter is checked against the model before the model is touched: keys the whole model
    would not have, shapes that differ, and keys missing for the modules held here are errors.
    """
    folder = Path(folder)
    settings = read_adapter_config(folder)
    with _open_adapter(folder) as (shapes, get):
        _check_fit(model, settings, shapes, folder)
        wrapped = apply_lora(model, settings)
        with torch.no_grad():
            for key, param in adapter_parameters(model).items():
                if key in shapes:
                    param.copy_(get(key))
    return wrapped


def adapter_folders(given: str | None) -> list[Path]:
    """The folders ``--adapter_name_or_path`` names: one path, or several separated by commas (a
    path that exists as written is one folder, even with a comma in its name)."""
    if not given:
        return []
    if Path(given).exists():
        return [Path(given)]
    return [Path(part.strip()) for part in given.split(",") if part.strip()]


def run_adapters(adapter_name_or_path: str | None, finetuning_type: str) -> list[Path]:
    """The adapter folders a run names, refused unless they sit on a LoRA run (chat, api, export)."""
    folders = adapter_folders(adapter_name_or_path)
    if folders and finetuning_type != "lora":
        raise ChipspanError(
            f"--adapter_name_or_path is for LoRA adapters, but --finetuning_type is {finetuning_type}: a "
            "full or freeze fine-tune is a whole model folder; pass it as --model_name_or_path, without adapters"
        )
    return folders


def check_adapters(config: ModelConfig, folders: list[Path]) -> list[LoraSettings]:
    """:func:`check_adapter` for each folder, before any weight is read."""
    return [check_adapter(config, folder) for folder in folders]


def load_adapters(model: CausalLM, folders: list[Path], keep_last: bool) -> None:
    """Apply adapters in order, as LLaMA-Factory does: each is merged into the weights before the
    next loads (in the weights' dtype: load in fp32 to merge in fp32). With ``keep_last`` the last
    stays a LoRA layer (to train further or to run unmerged); otherwise it is merged too."""
    for i, folder in enumerate(folders):
        load_adapter(model, folder)
        if not (keep_last and i == len(folders) - 1):
            merge_and_unload(model)


# --- helpers -------------------------------------------------------------------------------------


def _settings(model: nn.Module) -> LoraSettings:
    if not hasattr(model, "lora_settings"):
        raise ChipspanError("this model carries no LoRA adapter; inject or load one first")
    return model.lora_settings


def _check_fit(model: CausalLM, settings: LoraSettings, shapes: dict[str, tuple[int, ...]], folder: Path) -> None:
    """ChipspanError if the adapter's keys or shapes do not fit ``model`` (checked on meta copies)."""
    whole = _with_lora(model.config, settings, folder)
    part = _with_lora(
        model.config,
        settings,
        folder,
        layers=model.layer_indices,
        embed=model.model.embed_tokens is not None,
        head=model.lm_head is not None,
    )
    expected = {key: tuple(p.shape) for key, p in adapter_parameters(whole).items()}
    keys_of_param: dict[int, list[str]] = {}
    for key, param in adapter_parameters(part).items():
        keys_of_param.setdefault(id(param), []).append(key)
    problems = {
        "unexpected keys": [key for key in shapes if key not in expected],
        "shape mismatch": [
            f"{key} {shapes[key]} vs {expected[key]}"
            for key in shapes
            if key in expected and shapes[key] != expected[key]
        ],
        "missing keys": [keys[0] for keys in keys_of_param.values() if not any(k in shapes for k in keys)],
    }
    for problem, keys in problems.items():
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise ChipspanError(
                f"adapter in {folder} does not fit this {model.config.model_type} model — "
                f"{problem}: {', '.join(keys[:3])}{more}; was it trained on another base model?"
            )


def _with_lora(config: ModelConfig, settings: LoraSettings, folder: Path, **part) -> CausalLM:
    """A meta model of ``config`` (the ``part`` that CausalLM's keywords name) carrying the adapter's LoRA;
    ChipspanError naming adapter_config.json when its modules do not fit the model."""
    with torch.device("meta"):
        model = CausalLM(config, **part)
    try:
        apply_lora(model, settings)
    except ChipspanError as exc:
        raise ChipspanError(f"{folder / ADAPTER_CONFIG} does not fit this {config.model_type} model: {exc}") from None
    return model


@contextmanager
def _open_adapter(folder: Path) -> Iterator[tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]]:
    """(key -> shape, get(key) -> tensor) over the adapter's weights, read lazily from safetensors."""
    if (folder / ADAPTER_WEIGHTS).is_file():
        try:
            with safe_open(folder / ADAPTER_WEIGHTS, framework="pt", device="cpu") as handle:
                yield {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}, handle.get_tensor
        except SafetensorError as exc:
            raise ChipspanError(f"{folder / ADAPTER_WEIGHTS} is not a readable safetensors file ({exc})") from None
        return
    if (folder / ADAPTER_WEIGHTS_BIN).is_file():
        try:
            state = torch.load(folder / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad pickle
            raise ChipspanError(
                f"{folder / ADAPTER_WEIGHTS_BIN} is not a readable PyTorch file ({type(exc).__name__})"
            ) from None
        if not (
            isinstance(state, dict)
            and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in state.items())
        ):
            raise ChipspanError(
                f"{folder / ADAPTER_WEIGHTS_BIN} does not hold a dict of named tensors: re-save the adapter"
            )
        yield {k: tuple(t.shape) for k, t in state.items()}, state.__getitem__
        return
    raise ChipspanError(f"no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN}) in {folder}")
