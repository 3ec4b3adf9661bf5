"""LLaMA-Factory's settings that are not chipspan flags of their own, and what chipspan does with each.

The keys are every field of LLaMA-Factory 0.5 (llmtuner 0.5.1) and 0.9.5 training arguments and of the
Hugging Face ``Seq2SeqTrainingArguments`` they extend (transformers 4.36 and 4.57). Each is in one table:

- ``RENAMED``: another name of a chipspan flag (LLaMA-Factory 0.9 renamed some of 0.5's);
- ``CONVERTED``: a key whose value names a chipspan setting (``save_strategy: "no"`` is ``save_steps 0``);
- ``IDLE``: accepted whatever its value, because it cannot change the result here; runs say so in one
  notice line;
- ``REFUSED``: a feature chipspan does not have, refused with the reason and what to do instead,
  unless the value is one of the key's ``off`` values (then it asks for nothing and passes silently).

``OTHER_CHOICES`` are the words of chipspan's choice flags that LLaMA-Factory takes for features
chipspan does not have (``stage: dpo``), each with its reason.

``LF09_ONLY`` are the keys of 0.9.5 (and of its transformers) that 0.5 never had: a run that sets one is
read as written for LLaMA-Factory 0.9, and 0.9's defaults (``LF09_DEFAULTS``) replace 0.5's for the flags
it leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Refusal:
    """Why a key is refused, and the values of it that ask for nothing (spelled as :func:`spelled`)."""

    reason: str
    off: tuple[str, ...] = ("none", "false")

    def allows(self, value: Any) -> bool:
        return spelled(value) in self.off


def spelled(value: Any) -> str:
    """A value as one canonical word: None, "", "null", [] and {} -> "none"; booleans and their
    spellings -> "true"/"false"; numbers -> their shortest form ("0", "1", "0.5"); text lower-cased."""
    if value is None or value in ("", [], {}):
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text in ("none", "null", "~"):
        return "none"
    if text in ("true", "yes", "false", "no"):
        return "true" if text in ("true", "yes") else "false"
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)


# ---- another name of a chipspan flag -------------------------------------------------------------
RENAMED = {
    "evaluation_strategy": "eval_strategy",  # the Hugging Face Trainer's older name
    "freeze_trainable_layers": "num_layer_trainable",  # LLaMA-Factory 0.9's names for 0.5's
    "freeze_trainable_modules": "name_module_trainable",
    "per_gpu_train_batch_size": "per_device_train_batch_size",  # the Trainer's deprecated names
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
}

# ---- accepted, no effect -------------------------------------------------------------------------
_NO_CODE = "chipspan runs its own model code, never the model folder's"
_LOCAL = "chipspan reads local folders; nothing is downloaded for a model"
_LOADER = "batches are built in the training process"
_LOGS = "chipspan's own logs and trainer_log.jsonl"
_LAUNCHER = "torchrun and --chips choose the processes and devices"
_KERNELS = "a CUDA library; chipspan's layers are its own PyTorch code"
_ENGINE = "settings of an inference engine; chipspan generates with its own code"
_EXPORT = "settings of export (chipspan export), not of this command"
_PREFERENCE = "settings of the preference stages (rm, ppo, dpo, kto), which chipspan does not run"
_UNUSED_METHOD = "settings of a method that is off in this run"
_EVAL_LOOP = "the Trainer's evaluation loop internals; chipspan reports eval_loss itself"

IDLE: dict[str, str] = {
    **dict.fromkeys(["trust_remote_code"], _NO_CODE),
    **dict.fromkeys(
        ["cache_dir", "model_revision", "hf_hub_token", "ms_hub_token", "om_hub_token", "data_shared_file_system"],
        _LOCAL,
    ),
    "use_fast_tokenizer": "chipspan always reads tokenizer.json with the fast tokenizer",
    "low_cpu_mem_usage": "chipspan always loads weights tensor by tensor",
    "offload_folder": "chipspan does not offload weights to disk",
    "print_param_status": "chipspan prints the trainable parameter count",
    "flash_attn": "chipspan's attention is PyTorch's scaled_dot_product_attention",
    **dict.fromkeys(
        ["use_unsloth", "use_unsloth_gc", "enable_liger_kernel", "use_liger_kernel", "liger_kernel_config"], _KERNELS
    ),
    "use_v1_kernels": _KERNELS,
    "use_reentrant_gc": "chipspan's gradient checkpointing is never re-entrant",
    "gradient_checkpointing": "as in LLaMA-Factory, disable_gradient_checkpointing alone decides",
    "gradient_checkpointing_kwargs": "chipspan's gradient checkpointing takes no options",
    "use_kv_cache": "chipspan's generation always uses a key/value cache",
    "moe_aux_loss_coef": "chipspan's models have no mixture of experts",
    **dict.fromkeys(
        [
            "dataloader_num_workers",
            "dataloader_pin_memory",
            "dataloader_persistent_workers",
            "dataloader_prefetch_factor",
        ],
        _LOADER,
    ),
    **dict.fromkeys(
        [
            "log_level",
            "log_level_replica",
            "log_on_each_node",
            "logging_first_step",
            "logging_nan_inf_filter",
            "disable_tqdm",
            "skip_memory_metrics",
            "include_tokens_per_second",
            "include_num_input_tokens_seen",
            "include_effective_tokens_per_second",
            "project",
            "trackio_space_id",
            "ppo_logger",
        ],
        _LOGS,
    ),
    **dict.fromkeys(
        [
            "local_rank",
            "ddp_backend",
            "ddp_find_unused_parameters",
            "ddp_bucket_cap_mb",
            "ddp_broadcast_buffers",
            "average_tokens_across_devices",
            "master_addr",
            "master_port",
            "tpu_num_cores",
            "tpu_metrics_debug",
            "mp_parameters",
            "accelerator_config",
            "dispatch_batches",
            "split_batches",
            "ray_scope",
            "save_on_each_node",
            "use_mps_device",
        ],
        _LAUNCHER,
    ),
    **dict.fromkeys(["fp16_opt_level", "half_precision_backend", "fp16_backend"], "chipspan's own mixed precision"),
    "tf32": "chipspan's chips and the CPU have no TF32 mode to switch",
    "use_ipex": "a CPU library; chipspan's layers are its own PyTorch code",
    "full_determinism": "chipspan's CPU runs are deterministic; chips follow their vendor's kernels",
    **dict.fromkeys(
        ["torch_compile", "torch_compile_backend", "torch_compile_mode", "torchdynamo", "jit_mode_eval"],
        "chipspan runs eagerly",
    ),
    "torch_empty_cache_steps": "chipspan frees memory itself",
    "save_safetensors": "chipspan always writes safetensors",
    "restore_callback_states_from_checkpoint": "chipspan has no trainer callbacks",
    "remove_unused_columns": "chipspan keeps only the columns it encodes",
    **dict.fromkeys(["label_names", "past_index", "length_column_name", "debug"], "unused by causal language models"),
    **dict.fromkeys(
        [
            "prediction_loss_only",
            "eval_accumulation_steps",
            "eval_do_concat_batches",
            "eval_use_gather_object",
            "batch_eval_metrics",
            "include_inputs_for_metrics",
            "include_for_metrics",
            "use_legacy_prediction_loop",
            "metric_for_best_model",
            "greater_is_better",
        ],
        _EVAL_LOOP,
    ),
    **dict.fromkeys(
        ["generation_max_length", "generation_num_beams", "generation_config", "max_length", "sortish_sampler"],
        "--do_predict generates with max_new_tokens and the sampling flags",
    ),
    "length_penalty": "it applies to beam search, which chipspan does not run (num_beams 1)",
    **dict.fromkeys(
        [
            "hub_model_id",
            "hub_strategy",
            "hub_token",
            "hub_private_repo",
            "hub_always_push",
            "hub_revision",
            "push_to_hub_model_id",
            "push_to_hub_organization",
            "push_to_hub_token",
        ],
        "chipspan uploads nothing",
    ),
    **dict.fromkeys(
        [
            "infer_backend",
            "infer_dtype",
            "vllm_maxlen",
            "vllm_gpu_util",
            "vllm_enforce_eager",
            "vllm_max_lora_rank",
            "vllm_config",
            "sglang_maxlen",
            "sglang_mem_fraction",
            "sglang_tp_size",
            "sglang_config",
            "sglang_lora_backend",
        ],
        _ENGINE,
    ),
    **dict.fromkeys(
        [
            "export_dir",
            "export_size",
            "export_device",
            "export_quantization_bit",
            "export_legacy_format",
            "export_hub_model_id",
        ],
        _EXPORT,
    ),
    **dict.fromkeys(
        ["export_quantization_dataset", "export_quantization_nsamples", "export_quantization_maxlen"],
        "settings of GPTQ quantization on export, which chipspan does not run",
    ),
    **dict.fromkeys(
        [
            "pref_beta",
            "pref_ftx",
            "pref_bco_weight",
            "pref_loss",
            "dpo_beta",
            "dpo_ftx",
            "dpo_loss",
            "dpo_label_smoothing",
            "kto_chosen_weight",
            "kto_rejected_weight",
            "simpo_gamma",
            "ld_alpha",
            "ppo_buffer_size",
            "ppo_epochs",
            "ppo_score_norm",
            "ppo_target",
            "ppo_whiten_rewards",
            "ref_model",
            "ref_model_adapters",
            "ref_model_quantization_bit",
            "reward_model",
            "reward_model_adapters",
            "reward_model_quantization_bit",
            "reward_model_type",
        ],
        _PREFERENCE,
    ),
    **dict.fromkeys(
        [
            "quantization_device_map",
            "loraplus_lr_embedding",
            "pissa_iter",
            "pissa_convert",
            "oft_rank",
            "oft_block_size",
            "oft_target",
            "module_dropout",
            "galore_target",
            "galore_rank",
            "galore_update_interval",
            "galore_scale",
            "galore_proj_type",
            "galore_layerwise",
            "apollo_target",
            "apollo_rank",
            "apollo_update_interval",
            "apollo_scale",
            "apollo_proj",
            "apollo_proj_type",
            "apollo_scale_type",
            "apollo_layerwise",
            "apollo_scale_front",
            "badam_mode",
            "badam_start_block",
            "badam_switch_mode",
            "badam_switch_interval",
            "badam_update_ratio",
            "badam_mask_mode",
            "badam_verbose",
            "asft_alpha",
            "eaft_alpha",
            "hyper_parallel_args",
            "fp8_backend",
            "fp8_enable_fsdp_float8_all_gather",
            "kt_weight_path",
            "kt_expert_checkpoint_path",
            "kt_use_lora_experts",
            "kt_lora_expert_num",
            "kt_lora_expert_intermediate_size",
            "ray_init_kwargs",
            "optim_args",
            "swanlab_project",
            "swanlab_workspace",
            "swanlab_run_name",
            "swanlab_mode",
            "swanlab_api_key",
            "swanlab_logdir",
            "swanlab_lark_webhook_url",
            "swanlab_lark_secret",
            "profiler_output_dir",
            "profiler_wait_steps",
            "profiler_warmup_steps",
            "profiler_active_steps",
            "profiler_repeat",
            "profiler_record_shapes",
            "profiler_profile_memory",
            "profiler_with_stack",
            "profile_modules",
            "fsdp_min_num_params",
            "fsdp_transformer_layer_cls_to_wrap",
        ],
        _UNUSED_METHOD,
    ),
    "reserved_label_len": "LLaMA-Factory 0.5 kept it fixed at 1 token: chipspan's 0.5 truncation does the same",
}

# ---- refused unless off --------------------------------------------------------------------------
_SPANS = "chipspan spans the model over chips itself: use --chips 0-3 (one process) or --launcher torchrun"
_TEXT_ONLY = "images, videos and audio: chipspan trains text models only"
_OPTIMIZER = "chipspan trains with AdamW (optim adamw_torch, or adamw_8bit for 8-bit moments)"
_NOT_YET = "is not in chipspan"


def _method(name: str) -> str:
    return f"{name} {_NOT_YET}; drop the key to train without it"


REFUSED: dict[str, Refusal] = {
    **dict.fromkeys(["deepspeed", "fsdp", "fsdp_config", "parallelism_config", "use_mca"], Refusal(_SPANS)),
    "ray_num_workers": Refusal(_SPANS, off=("1",)),
    "use_hyper_parallel": Refusal(_SPANS),
    # LLaMA-Factory's defaults of its media settings ask for nothing; other values mean media.
    **{
        key: Refusal(_TEXT_ONLY, off=("none", "false", default))
        for key, default in (
            ("media_dir", "none"),
            ("image_max_pixels", "589824"),
            ("image_min_pixels", "1024"),
            ("image_do_pan_and_scan", "false"),
            ("crop_to_patches", "false"),
            ("video_max_pixels", "65536"),
            ("video_min_pixels", "256"),
            ("video_fps", "2"),
            ("video_maxlen", "128"),
            ("use_audio_in_video", "false"),
            ("audio_sampling_rate", "16000"),
            ("freeze_language_model", "false"),
        )
    },
    **dict.fromkeys(["freeze_vision_tower", "freeze_multi_modal_projector"], Refusal(_TEXT_ONLY, off=("true",))),
    "quantization_method": Refusal(
        "chipspan quantizes as bitsandbytes does (quantization_bit 4 or 8), in PyTorch on any chip",
        off=("none", "bnb", "bitsandbytes"),
    ),
    **dict.fromkeys(["adafactor", "use_adam_mini", "use_muon", "use_badam"], Refusal(_OPTIMIZER)),
    **{f"use_{name}": Refusal(_method(label)) for name, label in (("galore", "GaLore"), ("apollo", "APOLLO"))},
    "optim_target_modules": Refusal(_method("GaLore/APOLLO")),
    "use_dora": Refusal(_method("DoRA")),
    "use_rslora": Refusal(_method("rsLoRA")),
    "pissa_init": Refusal(_method("PiSSA initialisation")),
    "loraplus_lr_ratio": Refusal(_method("LoRA+")),
    "lora_bf16_mode": Refusal("chipspan keeps LoRA weights in fp32 (bf16 everywhere: --pure_bf16)"),
    "create_new_adapter": Refusal(
        "chipspan continues the adapter of --adapter_name_or_path; it does not stack a new one"
    ),
    "adapter_folder": Refusal("name the adapter with --adapter_name_or_path"),
    "freeze_extra_modules": Refusal(_method("training extra modules beside freeze's layers")),
    "use_llama_pro": Refusal(_method("LLaMA Pro")),
    "mixture_of_depths": Refusal(_method("mixture of depths")),
    "shift_attn": Refusal(_method("shift short attention (S^2-Attn)")),
    "rope_scaling": Refusal("chipspan uses the rope_scaling of the model's config.json; drop the key"),
    "train_from_scratch": Refusal(_method("training from random weights")),
    **dict.fromkeys(
        ["resize_vocab", "add_tokens", "add_special_tokens", "new_special_tokens_config"],
        Refusal(_method("growing the vocabulary")),
    ),
    "init_special_tokens": Refusal(_method("growing the vocabulary"), off=("noise_init",)),
    "split_special_tokens": Refusal("chipspan always reads special tokens as single tokens"),
    "upcast_layernorm": Refusal(_method("upcasting layer norms")),
    "upcast_lmhead_output": Refusal(_method("upcasting the LM head output")),
    **dict.fromkeys(["use_dft_loss", "use_asft_loss", "use_eaft_loss"], Refusal(_method("this loss"))),
    "use_kt": Refusal(_method("KTransformers")),
    "fp8": Refusal(_method("FP8 training")),
    "neftune_noise_alpha": Refusal(_method("NEFTune")),
    "label_smoothing_factor": Refusal(_method("label smoothing"), off=("0",)),
    "compute_accuracy": Refusal(_method("token accuracy")),
    "early_stopping_steps": Refusal(_method("early stopping")),
    "load_best_model_at_end": Refusal(
        "chipspan keeps the last model: pick a checkpoint by eval_loss in trainer_log.jsonl"
    ),
    "eval_on_start": Refusal(_method("evaluating before the first step")),
    "eval_delay": Refusal(_method("delaying evaluation"), off=("0",)),
    "eval_on_each_dataset": Refusal(_method("an eval_loss per dataset")),
    "eval_num_beams": Refusal("beam search " + _NOT_YET),
    "bf16_full_eval": Refusal("chipspan evaluates in the training precision"),
    "fp16_full_eval": Refusal("chipspan evaluates in the training precision"),
    "skip_special_tokens": Refusal("chipspan always drops special tokens from predictions", off=("true",)),
    "ignore_pad_token_for_loss": Refusal("chipspan never trains on padding", off=("true",)),
    "enable_thinking": Refusal(_method("answering without thinking"), off=("true",)),
    "preserve_thinking": Refusal(_method("keeping earlier turns' thoughts")),
    "disable_shuffling": Refusal(_method("training in file order")),
    "group_by_length": Refusal(_method("batches grouped by length")),
    "dataloader_drop_last": Refusal(_method("dropping the last partial batch")),
    "auto_find_batch_size": Refusal("`chipspan plan` finds a batch and split that fit before anything loads"),
    "ignore_data_skip": Refusal("a resumed run always skips the batches it has trained"),
    "data_seed": Refusal("chipspan draws the data order from --seed"),
    "logging_strategy": Refusal("chipspan logs every logging_steps steps", off=("steps",)),
    "save_strategy": Refusal("chipspan checkpoints every save_steps steps (--save_steps 0: never)", off=("steps",)),
    "lr_scheduler_kwargs": Refusal("chipspan's schedules take no options"),
    "push_to_hub": Refusal("chipspan uploads nothing: upload output_dir with huggingface-cli"),
    **dict.fromkeys(["use_cpu", "no_cuda"], Refusal("takes true or false (true: --device cpu)")),
    "preprocessing_batch_size": Refusal(
        "chipspan encodes in runs of 1,000 rows, LLaMA-Factory's default", off=("1000",)
    ),
    "use_swanlab": Refusal("takes true or false (true: --report_to swanlab)"),
    "enable_torch_profiler": Refusal(_method("the torch profiler")),
    "cache_path": Refusal(
        "chipspan caches encoded data itself (CHIPSPAN_CACHE; --overwrite_cache to re-encode): drop the key"
    ),
    "split": Refusal("chipspan reads the train split of each dataset", off=("train",)),
}

# Keys whose value says what a chipspan flag says: key -> {value (spelled): (flag, its value)}. Other
# values of them are refused (REFUSED) or have no effect (IDLE).
CONVERTED: dict[str, dict[str, tuple[str, Any]]] = {
    "save_strategy": {"false": ("save_steps", 0)},  # "no", which YAML also reads as false
    "use_cpu": {"true": ("device", "cpu")},
    "no_cuda": {"true": ("device", "cpu")},
    "use_swanlab": {"true": ("report_to", "swanlab")},
}

# Words of chipspan's choice flags that LLaMA-Factory takes and chipspan does not run.
OTHER_CHOICES = {
    "stage": {
        **dict.fromkeys(("rm", "ppo", "dpo", "kto"), "a preference stage, which chipspan does not run yet (sft, pt)")
    },
    "finetuning_type": {"oft": "OFT " + _NOT_YET + " (lora, full, freeze)"},
    "optim": {
        **dict.fromkeys(
            ("paged_adamw_8bit", "paged_adamw_32bit"),
            "paging moments out of a CUDA chip is bitsandbytes' own: use adamw_8bit, or --offload_optimizer "
            "to keep them in host memory",
        ),
        **dict.fromkeys(
            ("adafactor", "sgd", "adagrad", "rmsprop", "lion_8bit", "lion_32bit", "adamw_torch_4bit", "ademamix"),
            _OPTIMIZER,
        ),
    },
    "report_to": {
        **dict.fromkeys(
            ("comet_ml", "neptune", "clearml", "dvclive", "trackio", "azure_ml", "codecarbon", "flyte", "dagshub"),
            "a tracker chipspan does not log to (it logs to tensorboard, wandb, mlflow and swanlab)",
        )
    },
    "lr_scheduler_type": {
        **dict.fromkeys(
            (
                "cosine_with_restarts",
                "polynomial",
                "inverse_sqrt",
                "reduce_lr_on_plateau",
                "cosine_with_min_lr",
                "cosine_warmup_with_min_lr",
                "warmup_stable_decay",
            ),
            "a schedule " + _NOT_YET,
        )
    },
}

# Keys of LLaMA-Factory 0.9.5 and its transformers 4.57 that 0.5 and transformers 4.36 never had (and that
# are not chipspan flags of their own): they mark a run written for LLaMA-Factory 0.9.
LF09_ONLY = frozenset(
    """accelerator_config adapter_folder add_special_tokens add_tokens apollo_layerwise apollo_proj
    apollo_proj_type apollo_rank apollo_scale apollo_scale_front apollo_scale_type apollo_target
    apollo_update_interval asft_alpha audio_sampling_rate average_tokens_across_devices badam_mask_mode
    badam_mode badam_start_block badam_switch_interval badam_switch_mode badam_update_ratio badam_verbose
    batch_eval_metrics compute_accuracy crop_to_patches data_shared_file_system dataloader_prefetch_factor
    disable_shuffling dpo_label_smoothing eaft_alpha early_stopping_steps enable_liger_kernel
    enable_thinking enable_torch_profiler eval_do_concat_batches eval_on_each_dataset eval_on_start
    eval_use_gather_object export_device fp8 fp8_backend fp8_enable_fsdp_float8_all_gather
    freeze_extra_modules freeze_language_model freeze_multi_modal_projector freeze_trainable_layers
    freeze_trainable_modules freeze_vision_tower galore_layerwise galore_proj_type galore_rank galore_scale
    galore_target galore_update_interval hub_revision hyper_parallel_args image_do_pan_and_scan
    image_max_pixels image_min_pixels include_effective_tokens_per_second include_for_metrics infer_backend
    infer_dtype init_special_tokens kt_expert_checkpoint_path kt_lora_expert_intermediate_size
    kt_lora_expert_num kt_use_lora_experts kt_weight_path kto_chosen_weight kto_rejected_weight ld_alpha
    liger_kernel_config loraplus_lr_embedding loraplus_lr_ratio low_cpu_mem_usage master_addr master_port
    media_dir mixture_of_depths module_dropout moe_aux_loss_coef new_special_tokens_config offload_folder
    oft_block_size oft_rank oft_target om_hub_token optim_target_modules parallelism_config pissa_convert
    pissa_init pissa_iter pref_bco_weight pref_beta pref_ftx pref_loss preprocessing_batch_size
    preserve_thinking print_param_status profile_modules profiler_active_steps profiler_output_dir
    profiler_profile_memory profiler_record_shapes profiler_repeat profiler_wait_steps profiler_warmup_steps
    profiler_with_stack project quantization_device_map quantization_method ray_init_kwargs ray_num_workers
    restore_callback_states_from_checkpoint sglang_config sglang_lora_backend sglang_maxlen
    sglang_mem_fraction sglang_tp_size simpo_gamma skip_special_tokens swanlab_api_key swanlab_lark_secret
    swanlab_lark_webhook_url swanlab_logdir swanlab_mode swanlab_project swanlab_run_name swanlab_workspace
    torch_empty_cache_steps trackio_space_id train_from_scratch trust_remote_code
    use_adam_mini use_apollo use_asft_loss use_audio_in_video use_badam use_dft_loss use_dora use_eaft_loss
    use_galore use_hyper_parallel use_kt use_kv_cache use_liger_kernel use_llama_pro use_mca use_muon
    use_reentrant_gc use_rslora use_swanlab use_unsloth_gc use_v1_kernels video_fps video_max_pixels
    video_maxlen video_min_pixels vllm_config vllm_enforce_eager vllm_gpu_util vllm_max_lora_rank
    vllm_maxlen""".split()
)

# LLaMA-Factory 0.9.5's defaults where they differ from 0.5's (chipspan's), for a file written for 0.9.
LF09_DEFAULTS = {
    "template_revision": "lf-0.9",
    "cutoff_len": 2048,
    "lora_target": "all",
    "num_layer_trainable": 2,
    "name_module_trainable": "all",
    "max_new_tokens": 1024,
    "export_size": "5",
}
