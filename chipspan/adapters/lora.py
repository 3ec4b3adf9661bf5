"""LoRA: a trainable low-rank update beside each chosen linear layer of a frozen model.

    y = x W^T + b + dropout(x) A^T B^T * scaling     A (r, in), B (out, r), scaling = alpha / r
                                                                       (alpha / sqrt(r) with rsLoRA)

``inject_lora`` freezes every base parameter, wraps the target ``nn.Linear`` modules (or, on a
quantized base, ``QuantizedLinear`` ones) in ``LoraLinear`` and makes the ``additional_target`` modules fully trainable. Trainable tensors are
fp32 whatever the base dtype (LLaMA-Factory 0.5's ``--fp16``: frozen fp16 base, fp32 adapters). A LoRA layer
returns the base dtype by itself; fp32 additional targets on a fp16/bf16 base need the forward to
run under ``torch.autocast``, as LLaMA-Factory 0.5's mixed-precision training does. The settings stay on the
model as ``model.lora_settings``, for ``chipspan.adapters.peft_io`` to save.

Names are matched as PEFT matches them, so an adapter means the same thing here and in PEFT:

- targets: a module whose name is a target or ends with ``.<target>`` (``q_proj``,
  ``self_attn.q_proj``); a regex string (from a PEFT config) must match the whole module name.
  Only linear layers inside the decoder layers can carry LoRA (the loss reads ``lm_head.weight``
  directly, so LoRA on the head would be skipped): train the head with ``additional_target``.
- additional targets (PEFT's ``modules_to_save``): every module whose name *ends with* the text,
  so ``norm`` takes the final norm and every ``input_layernorm`` / ``post_attention_layernorm``.

Tied embeddings (``tie_word_embeddings``, e.g. SmolLM, Qwen2-0.5B): when an additional target takes
``embed_tokens`` or ``lm_head``, by default (``keep_tied=True``) the one shared matrix is trained
and both modules are saved — PEFT reads that back with ``ensure_weight_tying=True``. With
``keep_tied=False`` (PEFT's behaviour without ``ensure_weight_tying``) the two are untied: the named
module trains its own copy and the other keeps the base values, frozen (``model.tie_weights()``
would tie them again; so would an export that writes a tied model's head once).

A model that holds only some layers (a pipeline stage) wraps just the modules it holds; names are
checked against the whole model, so a stage without ``embed_tokens`` still accepts that name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chipspan.errors import ChipspanError
from chipspan.models.decoder import CausalLM
from chipspan.models.weights import decoder_linears
from chipspan.quant import QuantizedLinear

TIED_PAIR = ("model.embed_tokens", "lm_head")


@dataclass
class LoraSettings:
    """What to adapt and how; PEFT's ``LoraConfig`` fields of the same meaning."""

    target_modules: list[str] | str  # module names, or a regex over whole module names
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    use_rslora: bool = False
    modules_to_save: list[str] | None = None  # the additional targets
    keep_tied: bool = True

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Module):
    """A frozen linear layer plus a low-rank update: x (..., in) -> (..., out) in the base dtype.

    Over an ``nn.Linear``, the base ``weight`` (out, in) and ``bias`` (out,) stay attributes of
    this module, so their state-dict keys do not change. Over a ``QuantizedLinear`` (a quantized
    base, QLoRA) that module is kept whole as ``quantized_base`` and computes the base output.
    ``lora_A`` (in -> r) and ``lora_B`` (r -> out) are fp32 and the update is computed in their
    dtype. B starts at zero, so a fresh adapter changes nothing.
    """

    def __init__(
        self, base: nn.Linear | QuantizedLinear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, QuantizedLinear):
            self.quantized_base = base
            device = next(base.buffers()).device
        else:
            self.quantized_base = None
            self.weight = base.weight
            self.register_parameter("bias", base.bias)
            device = base.weight.device
        # Drawn on the CPU generator, then moved: the same seed gives the same adapter on any chip.
        init_device = "meta" if device.type == "meta" else "cpu"
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=init_device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=init_device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(device)
        self.lora_B.to(device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized_base is not None:
            out = self.quantized_base(x)
        else:
            out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return out + (update * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in) in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight (in fp32, stored back in the weight's dtype)."""
        if self.quantized_base is not None:
            raise ChipspanError(
                "a LoRA layer over a quantized base cannot be merged into it (the sum would be rounded "
                "to 4 or 8 bits): load the base without --quantization_bit, then apply the adapter"
            )
        if self.merged:
            raise ChipspanError("this LoRA layer is already merged; call unmerge() before merging again")
        self.weight.copy_(self.weight.float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (exact up to the weight's rounding)."""
        if not self.merged:
            raise ChipspanError("this LoRA layer is not merged; there is nothing to unmerge")
        self.weight.copy_(self.weight.float() - self.delta_weight())
        self.merged = False

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight (merging first if needed)."""
        if not self.merged:
            self.merge()
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"r={self.lora_A.out_features}, scaling={self.scaling:g}, merged={self.merged}"
        )


# --- injection -----------------------------------------------------------------------------------


def inject_lora(
    model: nn.Module,
    target: str | Sequence[str],
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    additional_target: str | Sequence[str] | None = None,
    use_rslora: bool = False,
    keep_tied: bool = True,
) -> list[str]:
    """Freeze ``model`` and add LoRA to the ``target`` linear layers; returns the wrapped names.

    Args:
        target: comma list of module names ("q_proj,v_proj") or "all" (every linear layer in the
            decoder layers).
        alpha: the update's scale numerator; None means 2 * r (LLaMA-Factory 0.5's default).
        additional_target: comma list of modules to train fully, e.g. "embed_tokens,lm_head".
        keep_tied: with tied embeddings, train the shared matrix as one (see the module notes).
    """
    settings = LoraSettings(
        target_modules=_split(target),
        r=r,
        alpha=2 * r if alpha is None else alpha,
        dropout=dropout,
        use_rslora=use_rslora,
        modules_to_save=_split(additional_target) or None,
        keep_tied=keep_tied,
    )
    if not settings.target_modules:
        raise ChipspanError("lora_target is empty; name the layers to adapt, e.g. q_proj,v_proj, or all")
    if settings.target_modules == ["all"]:
        settings.target_modules = sorted({name.rpartition(".")[2] for name in decoder_linears(_reference(model))})
    return apply_lora(model, settings)


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Freeze ``model``, wrap the modules ``settings`` name, train the additional ones; returns the wrapped names."""
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ChipspanError("this model already carries LoRA layers; load or inject one adapter only")
    _check_numbers(settings)
    reference = _reference(model)
    targets = _resolve_targets(reference, settings.target_modules)
    extra = additional_modules(model, settings)
    inside = [t for t in targets if any(t == e or t.startswith(e + ".") for e in extra)]
    if inside:
        raise ChipspanError(f"{inside[0]} is both a lora_target and inside an additional_target; train it one way only")
    for param in model.parameters():
        param.requires_grad_(False)
    held = dict(model.named_modules())
    wrapped = [name for name in targets if name in held]
    for name in wrapped:
        parent, _, child = name.rpartition(".")
        layer = LoraLinear(held[name], settings.r, settings.alpha, settings.dropout, settings.use_rslora)
        setattr(model.get_submodule(parent), child, layer)
    if not settings.keep_tied and _is_tied(model) and set(TIED_PAIR) & set(extra):
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    for name in extra:
        if name in held:
            for param in held[name].parameters():
                param.data = param.data.float()
                param.requires_grad_(True)
    model.lora_settings = settings
    return wrapped


def additional_modules(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Names (in the whole model) of the modules trained fully, the tied partner included."""
    names = settings.modules_to_save or []
    reference = _reference(model)
    every = [name for name, _ in reference.named_modules() if name]
    for wanted in names:
        if not any(name.endswith(wanted) for name in every):
            raise ChipspanError(
                f"additional_target '{wanted}' matches no module; this model has: {', '.join(_short_names(every))}"
            )
    found = [name for name in every if any(name.endswith(wanted) for wanted in names)]
    if settings.keep_tied and _ties_in_config(model) and set(TIED_PAIR) & set(found):
        found += [name for name in TIED_PAIR if name not in found]
    return found


def ties_trained_embeddings(model: nn.Module) -> bool:
    """Whether the shared embedding/head matrix of a tied model is trained as one (PEFT's ensure_weight_tying)."""
    settings = model.lora_settings
    return (
        settings.keep_tied
        and _ties_in_config(model)
        and bool(set(TIED_PAIR) & set(additional_modules(model, settings)))
    )


# --- merging -------------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA update into its base weight (forward then skips the LoRA path)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> None:
    """Replace every ``LoraLinear`` by a plain merged ``nn.Linear``: HF parameter names only, ready to export.

    Additional-target modules keep their trained fp32 values.
    """
    for name, layer in lora_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.merged_linear())
    if hasattr(model, "lora_settings"):
        del model.lora_settings


# --- helpers -------------------------------------------------------------------------------------


def _split(names: str | Sequence[str] | None) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        names = names.split(",")
    return [n.strip() for n in names if n.strip()]


def _check_numbers(settings: LoraSettings) -> None:
    if not (isinstance(settings.r, int) and settings.r > 0):
        raise ChipspanError(f"lora_rank must be a positive integer, not {settings.r!r}")
    if not settings.alpha > 0:
        raise ChipspanError(f"lora_alpha must be positive, not {settings.alpha!r}")
    if not 0 <= settings.dropout < 1:
        raise ChipspanError(f"lora_dropout must be in [0, 1), not {settings.dropout!r}")


def _reference(model: nn.Module) -> nn.Module:
    """The whole model, on ``meta``, to check names against; a part of a CausalLM may lack some."""
    if not isinstance(model, CausalLM):
        return model
    with torch.device("meta"):
        return CausalLM(model.config)


def _ties_in_config(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def _is_tied(model: nn.Module) -> bool:
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    return embed is not None and head is not None and head.weight is embed.weight


def _short_names(names: list[str]) -> list[str]:
    return sorted({name.rpartition(".")[2] for name in names if not name.rpartition(".")[2].isdigit()})


def _resolve_targets(reference: nn.Module, target: list[str] | str) -> list[str]:
    """Whole-model names of the linear layers ``target`` selects; ChipspanError if one selects nothing."""
    linears = decoder_linears(reference)
    if isinstance(target, str):
        if target == "all-linear":  # PEFT's shorthand
            return linears
        chosen = [name for name, _ in reference.named_modules() if re.fullmatch(target, name)]
        if not chosen:
            raise ChipspanError(f"target_modules pattern '{target}' matches no module of this model")
        groups = {target: chosen}
    else:
        groups = {
            t: [name for name, _ in reference.named_modules() if name == t or name.endswith("." + t)] for t in target
        }
    for wanted, chosen in groups.items():
        if not chosen:
            raise ChipspanError(
                f"lora_target '{wanted}' matches no module; this model has: {', '.join(_short_names(linears))}"
            )
        other = [name for name in chosen if name not in linears]
        if other:
            raise ChipspanError(
                f"lora_target '{wanted}' selects {other[0]}, which is not a linear layer "
                f"of a decoder layer; choose from: {', '.join(_short_names(linears))} "
                "(train other modules fully with additional_target)"
            )
    selected = {name for chosen in groups.values() for name in chosen}
    return [name for name in linears if name in selected]
