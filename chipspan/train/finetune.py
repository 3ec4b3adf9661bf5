"""What trains: LoRA adapters, the whole model, or the last (or first) few layers ("freeze").

Trainable parameters are fp32 (bf16 under ``--pure_bf16``), whatever dtype the frozen base is kept in
(LLaMA-Factory 0.5's ``--fp16``: frozen fp16 base, fp32 trainable weights).
"""

from __future__ import annotations

import torch

from chipspan.adapters.freeze import freeze_layers, freeze_modules
from chipspan.adapters.lora import inject_lora
from chipspan.adapters.peft_io import adapter_folders, check_adapter, load_adapter
from chipspan.args import FinetuningArguments
from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig
from chipspan.models.decoder import CausalLM


def check_finetuning_arguments(args: FinetuningArguments, config: ModelConfig, adapter: str | None = None) -> None:
    """Refuse settings that cannot work, before anything loads (module names checked on a meta model).

    LoRA from an ``adapter`` folder: its config and weights are checked instead of the LoRA flags.
    """
    num_layers = config.num_hidden_layers
    if args.finetuning_type == "lora" and adapter:
        folders = adapter_folders(adapter)
        if len(folders) > 1:
            raise ChipspanError(
                f"--adapter_name_or_path names {len(folders)} adapters; training continues one: merge the "
                "others into the base first (chipspan export), then train on the exported model"
            )
        check_adapter(config, folders[0])
        return
    if args.finetuning_type == "lora" and not args.lora_target:
        raise ChipspanError("LoRA needs --lora_target: the layers to adapt, e.g. q_proj,v_proj (or all)")
    if args.finetuning_type == "lora":
        with torch.device("meta"):
            inject_lora(
                CausalLM(config),
                args.lora_target,
                r=args.lora_rank,
                alpha=args.lora_alpha,
                dropout=args.lora_dropout,
                additional_target=args.additional_target,
            )
    if args.finetuning_type == "freeze":
        freeze_modules(args.name_module_trainable)
        freeze_layers(num_layers, args.num_layer_trainable)


def prepare_trainable(
    stages: list[CausalLM],
    args: FinetuningArguments,
    adapter: str | None = None,
    trained_dtype: torch.dtype = torch.float32,
) -> None:
    """Mark what trains on ``stages`` (all of the model's, or one rank's) and make it
    ``trained_dtype`` (fp32 unless --pure_bf16).

    LoRA: a new adapter, or ``adapter`` (a PEFT folder) to train further. New LoRA weights are drawn
    in layer order on the CPU generator, so a seed gives the same adapter however the model is spanned.
    """
    if args.finetuning_type == "lora":
        for stage in stages:
            if adapter:
                load_adapter(stage, adapter)
            else:
                add_new_lora(stage, args)
        trainable: list[str] | None = None
    else:
        trainable = _freeze_selection(args, stages[0].config.num_hidden_layers)
    for stage in stages:
        for name, param in stage.named_parameters():
            if args.finetuning_type != "lora":
                param.requires_grad_(trainable is None or any(name.startswith(prefix) for prefix in trainable))
            if param.requires_grad:
                param.data = param.data.to(trained_dtype)


def add_new_lora(model: torch.nn.Module, args: FinetuningArguments) -> list[str]:
    """Wrap ``args.lora_target`` of ``model`` in new LoRA layers as the flags say; the wrapped names."""
    return inject_lora(
        model,
        args.lora_target,
        r=args.lora_rank,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        additional_target=args.additional_target,
    )


def _freeze_selection(args: FinetuningArguments, num_layers: int) -> list[str] | None:
    """Parameter-name prefixes that train under "freeze"; None (everything) under "full"."""
    if args.finetuning_type == "full":
        return None
    return [
        f"model.layers.{i}.{module}."
        for i in freeze_layers(num_layers, args.num_layer_trainable)
        for module in freeze_modules(args.name_module_trainable)
    ]


def count_trainable(config: ModelConfig, args: FinetuningArguments) -> tuple[int, int, int]:
    """(trainable, total) parameters of a job and its number of trainable tensors, counted on a
    meta-device model: nothing is allocated."""
    with torch.device("meta"):
        whole = CausalLM(config)
    prepare_trainable([whole], args)
    parameters = list(whole.parameters())
    trained = [p for p in parameters if p.requires_grad]
    return sum(p.numel() for p in trained), sum(p.numel() for p in parameters), len(trained)
