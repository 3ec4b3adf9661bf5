"""Run settings, spelled as LLaMA-Factory (and the Hugging Face Trainer) spell them.

Flags come from the command line (``--key value``, ``--flag`` or ``--flag true``), from a YAML file
(``chipspan train run.yaml key=value ...``), and for chips from LLaMA-Factory 0.5's environment variables
``USE_SOPHGO``, ``SOPHGO_SPLIT`` and ``CHIPS``. Defaults are LLaMA-Factory 0.5's (commit b988ce0).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from chipspan import lf_keys
from chipspan.errors import ChipspanError, shown


@dataclass(frozen=True)
class Range:
    """The values a numeric flag may take (declared as its field's ``range`` metadata).

    From ``low`` to ``high`` (None: unbounded), either end open; numbers above ``whole_above`` must
    be whole (val_size: a fraction, or a count of rows). ``example`` is shown in the refusal
    (default: the flag's default). NaN and infinity are never in a range.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    example: str | None = None
    whole_above: float | None = None
    only: tuple[float, ...] | None = None  # the only values allowed (--quantization_bit: 4 or 8)

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        if self.only is not None and value not in self.only:
            return False
        return self.whole_above is None or value < self.whole_above or value == int(value)

    def describe(self) -> str:
        """The range in words, e.g. "> 0", ">= 1", "in [0, 1)"."""
        low, high = _number(self.low), _number(self.high)
        if self.only is not None:
            return " or ".join(_number(value) for value in self.only)
        if self.whole_above is not None:
            return f"in [{low}, {_number(self.whole_above)}) or a whole count >= {_number(self.whole_above)}"
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"{'<' if self.high_open else '<='} {high}" if self.high is not None else ""


def _number(value: float | None) -> str:
    """4294967295 as it is, 5e-05 as :g writes it; None as ""."""
    if value is None:
        return ""
    return str(int(value)) if value == int(value) else f"{value:g}"


POSITIVE = Range(0, low_open=True)
AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
BETA = Range(0, 1, high_open=True)
MAX_BATCH = 1 << 20  # examples per batch (and accumulation steps) at most: the plan tries its divisors
BATCH = Range(1, MAX_BATCH)
SEEDS = Range(0, 2**32 - 1, example="42")  # what numpy's generator takes


@dataclass(frozen=True)
class Choices:
    """The words a text flag may take (declared as its field's ``choices`` metadata).

    One of ``words``; with ``comma_list``, one or more of them comma-separated, or ``all`` alone.
    ``older`` holds (older name, word) pairs: an older name is read as its word.
    """

    words: tuple[str, ...]
    comma_list: bool = False
    older: tuple[tuple[str, str], ...] = ()

    def current(self, value: str) -> str:
        """``value`` with an older name replaced by the word it stands for."""
        return dict(self.older).get(value, value)

    def describe(self) -> str:
        """The choices in words, e.g. "one of no, steps, epoch"."""
        older = "".join(f" ({old} = {word})" for old, word in self.older)
        return f"one of {', '.join(self.words)}{older}" + (" (a comma list of them, or all)" if self.comma_list else "")


# The words each fixed-choice flag takes; the modules that act on them import these.
STAGES = Choices(("sft", "pt"))
FINETUNING_TYPES = Choices(("lora", "full", "freeze"))
FREEZE_MODULES = Choices(("mlp", "self_attn"), comma_list=True)
LR_SCHEDULER_TYPES = Choices(("linear", "cosine", "constant", "constant_with_warmup"))
EVAL_STRATEGIES = Choices(("no", "steps", "epoch"))
REPORT_TO = Choices(("none", "tensorboard", "wandb", "mlflow", "swanlab"), comma_list=True)
# lf-0.5: LLaMA-Factory 0.5 (commit b988ce0, llmtuner 0.5.1), once called "seed".
TEMPLATE_REVISIONS = Choices(("lf-0.5", "lf-0.9"), older=(("seed", "lf-0.5"),))
TOOL_FORMATS = Choices(("default", "llama3", "qwen", "mistral", "glm4"))
MIX_STRATEGIES = Choices(("concat", "interleave_under", "interleave_over", "interleave_once"))
PIPELINE_SCHEDULES = Choices(("gpipe", "1f1b", "interleaved1f1b"))
LAUNCHERS = Choices(("torchrun",))
QUANTIZATION_TYPES = Choices(("nf4", "fp4"))
EXPORT_DEVICES = Choices(("cpu", "auto"))
EXPORT_FORMATS = Choices(("hf", "gguf"))
GGUF_TYPES = Choices(("f32", "f16", "bf16", "q8_0"))
EXPORT_DTYPES = Choices(("auto", "float32", "float16", "bfloat16"))
# The Hugging Face Trainer's names; fused and device-specific AdamW kernels compute the same AdamW.
OPTIMIZERS = Choices(
    ("adamw_torch", "adamw_8bit"),
    older=(
        ("adamw_torch_fused", "adamw_torch"),
        ("adamw_torch_npu_fused", "adamw_torch"),
        ("adamw_torch_xla", "adamw_torch"),
        ("adamw_bnb_8bit", "adamw_8bit"),
        ("adamw_torch_8bit", "adamw_8bit"),
    ),
)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Hugging Face model folder"})
    adapter_name_or_path: str | None = field(default=None, metadata={"help": "LoRA adapter to start from"})
    quantization_bit: int | None = field(
        default=None,
        metadata={"help": "LoRA: quantize the frozen base to 4 or 8 bits as it loads", "range": Range(only=(4, 8))},
    )
    quantization_type: str = field(
        default="nf4", metadata={"help": "the 4-bit code (QLoRA's nf4, or fp4)", "choices": QUANTIZATION_TYPES}
    )
    double_quantization: bool = field(
        default=True, metadata={"help": "4-bit: quantize the block scales too (QLoRA's double quantization)"}
    )


@dataclass
class DataArguments:
    dataset: str | None = field(default=None, metadata={"help": "comma-separated dataset names"})
    eval_dataset: str | None = field(
        default=None, metadata={"help": "comma-separated datasets evaluated whole (instead of --val_size)"}
    )
    dataset_dir: str = field(default="data", metadata={"help": "folder with dataset_info.json and files"})
    template: str = field(default="default", metadata={"help": "prompt template"})
    template_revision: str = field(
        default="lf-0.5", metadata={"help": "template tables", "choices": TEMPLATE_REVISIONS}
    )
    cutoff_len: int = field(default=1024, metadata={"help": "max tokens per example", "range": AT_LEAST_1})
    max_samples: int | None = field(
        default=None, metadata={"help": "first N rows of each dataset", "range": Range(1, example="1000")}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "re-encode the dataset"})
    val_size: float = field(
        default=0.0,
        metadata={"help": "held-out rows (count or fraction)", "range": Range(0, example="0.1", whole_above=1)},
    )
    train_on_prompt: bool = field(default=False, metadata={"help": "train on prompt tokens too"})
    mask_history: bool = field(default=False, metadata={"help": "train only the last assistant turn"})
    default_system: str | None = field(default=None, metadata={"help": "replace the template's system prompt"})
    tool_format: str | None = field(
        default=None, metadata={"help": "how tool calls are written (lf-0.9)", "choices": TOOL_FORMATS}
    )
    packing: bool | None = field(
        default=None, metadata={"help": "pack SFT examples into cutoff_len blocks, each kept apart in attention"}
    )
    sft_packing: bool = field(default=False, metadata={"help": "LLaMA-Factory 0.5's name for --packing"})
    neat_packing: bool = field(
        default=False, metadata={"help": "accepted from LLaMA-Factory; chipspan's packing always keeps examples apart"}
    )
    mix_strategy: str = field(
        default="concat", metadata={"help": "how several datasets make one", "choices": MIX_STRATEGIES}
    )
    interleave_probs: str | None = field(
        default=None, metadata={"help": "comma list of sampling probabilities, one per dataset (interleave)"}
    )
    streaming: bool = field(default=False, metadata={"help": "read JSON-lines files lazily"})
    buffer_size: int = field(default=16384, metadata={"help": "shuffle buffer when streaming", "range": AT_LEAST_1})
    tokenized_path: str | None = field(
        default=None,
        metadata={"help": "folder for the encoded examples: read when it has them, else written (LLaMA-Factory 0.9)"},
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "accepted from LLaMA-Factory; encoding runs in one process", "range": Range(1, example="8")},
    )


@dataclass
class FinetuningArguments:
    stage: str = field(default="sft", metadata={"help": "what training does", "choices": STAGES})
    finetuning_type: str = field(default="lora", metadata={"help": "what trains", "choices": FINETUNING_TYPES})
    lora_target: str | None = field(default=None, metadata={"help": "comma list of module names, or all"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank", "range": AT_LEAST_1})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha (default 2 * rank)", "range": Range(0, low_open=True, example="16")}
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "dropout on the LoRA input", "range": Range(0, 1, high_open=True, example="0.05")},
    )
    additional_target: str | None = field(default=None, metadata={"help": "modules trained in full beside LoRA"})
    num_layer_trainable: int = field(default=3, metadata={"help": "freeze: layers trained (<0: the first)"})
    name_module_trainable: str = field(
        default="mlp", metadata={"help": "freeze: modules trained", "choices": FREEZE_MODULES}
    )
    plot_loss: bool = field(default=False, metadata={"help": "write training_loss.png"})
    pure_bf16: bool = field(default=False, metadata={"help": "everything in bf16, trained weights too, no autocast"})
    stochastic_rounding: bool = field(
        default=True,
        metadata={"help": "--pure_bf16: round each update stochastically so small ones still count (false: nearest)"},
    )


@dataclass
class TrainingArguments:
    output_dir: str | None = field(default=None, metadata={"help": "where results and checkpoints go"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start over in a non-empty output_dir"})
    do_train: bool = field(default=False, metadata={"help": "train (LLaMA-Factory 0.5's flag)"})
    do_eval: bool = field(
        default=False, metadata={"help": "report eval_loss (held-out rows; all rows without --do_train)"}
    )
    do_predict: bool = field(
        default=False, metadata={"help": "answer the eval rows and write generated_predictions.jsonl"}
    )
    eval_strategy: str = field(
        default="no", metadata={"help": "when to evaluate while training", "choices": EVAL_STRATEGIES}
    )
    eval_steps: int | None = field(
        default=None,
        metadata={"help": "evaluate every N steps (default logging_steps)", "range": Range(1, example="100")},
    )
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "examples per eval batch", "range": BATCH})
    predict_with_generate: bool = field(default=False, metadata={"help": "accepted; --do_predict always generates"})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "examples per step and device", "range": BATCH}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-steps per optimizer step", "range": BATCH}
    )
    micro_batches: int | None = field(
        default=None,
        metadata={
            "help": "split each batch into M micro-batches pipelined over the chips (default: the plan's choice)",
            "range": Range(1, MAX_BATCH, example="4"),
        },
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate", "range": POSITIVE})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "range": Range(0, example="0.01")})
    optim: str = field(
        default="adamw_torch", metadata={"help": "AdamW, or AdamW with 8-bit moments", "choices": OPTIMIZERS}
    )
    offload_optimizer: bool = field(
        default=False,
        metadata={"help": "fp32 master weights and AdamW moments in host memory, stepped there (DeepSpeed's name)"},
    )
    optimizer_in_bwd: bool = field(
        default=False,
        metadata={"help": "step each weight inside backward, so whole-model gradients never exist (torchtune's name)"},
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1", "range": BETA})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2", "range": BETA})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon", "range": POSITIVE})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "clip the global gradient norm (0: off)", "range": AT_LEAST_0}
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "epochs (fractions allowed)", "range": AT_LEAST_0})
    max_steps: int = field(
        default=-1,
        metadata={"help": "optimizer steps; overrides num_train_epochs (-1: off)", "range": Range(-1, example="1000")},
    )
    lr_scheduler_type: str = field(
        default="linear", metadata={"help": "learning-rate schedule", "choices": LR_SCHEDULER_TYPES}
    )
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps", "range": AT_LEAST_0})
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "warm-up as a fraction of all steps", "range": Range(0, 1, example="0.1")}
    )
    logging_steps: int = field(default=500, metadata={"help": "log every N steps", "range": AT_LEAST_1})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps (0: never)", "range": AT_LEAST_0})
    save_total_limit: int | None = field(
        default=None, metadata={"help": "keep the newest N checkpoints", "range": Range(1, example="3")}
    )
    save_only_model: bool = field(
        default=False, metadata={"help": "checkpoints hold the weights only, no optimizer state (not resumable)"}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "a checkpoint folder to continue from, or true for the last one in output_dir"}
    )
    seed: int = field(default=42, metadata={"help": "random seed (shuffling, LoRA init, dropout)", "range": SEEDS})
    fp16: bool = field(default=False, metadata={"help": "fp16 frozen weights / autocast"})
    bf16: bool = field(default=False, metadata={"help": "bf16 frozen weights / autocast"})
    disable_gradient_checkpointing: bool = field(default=False, metadata={"help": "keep all activations"})
    ddp_timeout: int = field(
        default=1800,
        metadata={"help": "under torchrun: seconds a rank waits for the others at most", "range": AT_LEAST_1},
    )
    report_to: str = field(
        default="none", metadata={"help": "where logs go (all: every one installed)", "choices": REPORT_TO}
    )
    run_name: str | None = field(
        default=None, metadata={"help": "the run's name in wandb, mlflow and swanlab (default: output_dir)"}
    )
    logging_dir: str | None = field(default=None, metadata={"help": "TensorBoard folder (default output_dir/runs)"})

    @property
    def moment_bits(self) -> int:
        """Bits per element of each AdamW moment as --optim keeps it: 8 (adamw_8bit) or 32."""
        return 8 if self.optim == "adamw_8bit" else 32


@dataclass
class ChipArguments:
    device: str | None = field(default=None, metadata={"help": "cpu | cuda | tpu | npu | xpu | emu | ..."})
    chips: str | None = field(default=None, metadata={"help": "chips to span, e.g. 0-3 or 0,1 (default: 0)"})
    chip_memory: str | None = field(
        default=None,
        metadata={
            "help": "memory of one chip, e.g. 16GiB: the budget `plan` checks; the limit of emulated chips",
            "size": True,
        },
    )
    usable_fraction: float = field(
        default=1.0,
        metadata={
            "help": "share of chip_memory a job may use (plan)",
            "range": Range(0, 1, low_open=True, example="0.9"),
        },
    )
    launcher: str | None = field(
        default=None,
        metadata={"help": "one process per chip (re-runs this command under it)", "choices": LAUNCHERS},
    )
    pipeline_schedule: str = field(
        default="1f1b",
        metadata={
            "help": "one process per chip: how micro-batches flow (interleaved1f1b: 2 stages per process)",
            "choices": PIPELINE_SCHEDULES,
        },
    )
    data_parallel: int = field(
        default=1,
        metadata={
            "help": "one process per chip: data-parallel replicas of the pipeline (processes = stages x this)",
            "range": Range(1, example="2"),
        },
    )


@dataclass
class GeneratingArguments:
    """How chat, api and --do_predict answer (LLaMA-Factory 0.5's defaults: sampling at temperature 0.95,
    top_p 0.7, top_k 50)."""

    do_sample: bool = field(default=True, metadata={"help": "sample (false: greedy)"})
    temperature: float = field(default=0.95, metadata={"help": "sampling temperature", "range": POSITIVE})
    top_p: float = field(default=0.7, metadata={"help": "nucleus sampling mass", "range": Range(0, 1, low_open=True)})
    top_k: int = field(
        default=50, metadata={"help": "sample among the k likeliest tokens (0: all)", "range": AT_LEAST_0}
    )
    max_new_tokens: int = field(
        default=512, metadata={"help": "tokens generated per answer at most", "range": AT_LEAST_1}
    )
    num_beams: int = field(default=1, metadata={"help": "1 (beam search is not supported)", "range": AT_LEAST_1})
    repetition_penalty: float = field(
        default=1.0,
        metadata={
            "help": "chat/api: divide the logits of tokens already in the sequence by it, as transformers "
            "does (1.0: off; --do_predict takes 1.0 only)",
            "range": POSITIVE,
        },
    )


@dataclass
class ExportArguments:
    """``chipspan export``: LLaMA-Factory's export flags (0.5's defaults) and the GGUF ones."""

    export_dir: str | None = field(default=None, metadata={"help": "folder to write (new or empty)"})
    export_size: str = field(
        default="1", metadata={"help": "shard size: GB as a whole number (LLaMA-Factory's), or a size like 500MB"}
    )
    export_device: str = field(
        default="cpu",
        metadata={"help": "where adapters merge: cpu, or auto (the first chip)", "choices": EXPORT_DEVICES},
    )
    export_legacy_format: bool = field(default=False, metadata={"help": "write pytorch_model*.bin, not safetensors"})
    infer_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the written weights (auto: the base model's)", "choices": EXPORT_DTYPES},
    )
    export_format: str = field(
        default="hf", metadata={"help": "hf (a Hugging Face folder) or gguf (llama.cpp)", "choices": EXPORT_FORMATS}
    )
    export_quantization: str = field(default="f16", metadata={"help": "gguf: the tensors' type", "choices": GGUF_TYPES})
    export_quantization_bit: int | None = field(
        default=None,
        metadata={
            "help": "refused: GPTQ",
            "refused": "GPTQ quantization needs CUDA-only libraries; export --export_format gguf "
            "--export_quantization q8_0 instead",
        },
    )
    export_hub_model_id: str | None = field(
        default=None,
        metadata={
            "help": "refused: uploading",
            "refused": "chipspan uploads nothing (no network); upload export_dir with `huggingface-cli upload`",
        },
    )


@dataclass
class RunArguments:
    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    training: TrainingArguments
    chips: ChipArguments
    generating: GeneratingArguments
    export: ExportArguments = field(default_factory=ExportArguments)  # read by `chipspan export` only
    notices: tuple[str, ...] = ()  # one line each: what was accepted without effect, whose defaults apply
    given: frozenset[str] = frozenset()  # the flags the run set (by flag, YAML or environment)


_GROUPS = (
    ("model", ModelArguments),
    ("data", DataArguments),
    ("finetuning", FinetuningArguments),
    ("training", TrainingArguments),
    ("chips", ChipArguments),
    ("generating", GeneratingArguments),
)
# The flag groups each command reads; a command not named reads train's.
COMMAND_GROUPS = {"export": (*_GROUPS, ("export", ExportArguments))}


def _groups(command: str) -> tuple[tuple[str, type], ...]:
    return COMMAND_GROUPS.get(command, _GROUPS)


def known_flags(command: str = "train") -> dict[str, tuple[str, dataclasses.Field, type]]:
    """flag name -> (group, field, python type), for ``command``'s flags."""
    flags = {}
    for group, cls in _groups(command):
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flags[f.name] = (group, f, hints[f.name])
    return flags


def parse_run_arguments(
    argv: list[str], environ: Mapping[str, str] = os.environ, command: str = "train"
) -> RunArguments:
    """Parse ``[run.yaml] [key=value ...] [--key value ...]`` as ``command`` reads them; later settings win."""
    values = _collect(argv)
    values = {**_sophgo_environment(environ), **values}
    return build_run_arguments(values, command)


# Other names of flags (LLaMA-Factory 0.9's, the Hugging Face Trainer's older ones), read as chipspan's.
ALIASES = lf_keys.RENAMED


def build_run_arguments(values: Mapping[str, Any], command: str = "train") -> RunArguments:
    """Typed, validated RunArguments from a flat name -> value mapping (strings are converted).

    Every problem of the settings (unknown or refused keys, values of the wrong kind, out of range or
    not among the choices) is reported at once, in one ChipspanError; what was accepted without effect,
    and 0.9's defaults for a run written for LLaMA-Factory 0.9, become ``notices``."""
    groups = _groups(command)
    flags = known_flags(command)
    settings, problems, idle = _sort_keys(values, flags)
    lf09_keys = sorted(set(values) & lf_keys.LF09_ONLY)
    lf09_defaults = (
        {k: v for k, v in lf_keys.LF09_DEFAULTS.items() if k in flags and k not in settings} if lf09_keys else {}
    )
    grouped: dict[str, dict[str, Any]] = {group: {} for group, _ in groups}
    for name, raw in {**settings, **lf09_defaults}.items():
        group, spec, kind = flags[name]
        choices = spec.metadata.get("choices")
        if choices and choices.comma_list and isinstance(raw, list):  # a YAML list: report_to: [wandb, mlflow]
            raw = ",".join(map(str, raw))
        try:
            value = _convert(name, raw, kind)
        except ChipspanError as exc:
            problems.append(str(exc))
            continue
        grouped[group][name] = choices.current(value) if choices and isinstance(value, str) else value
    run = RunArguments(**{group: cls(**grouped[group]) for group, cls in groups}, given=frozenset(settings))
    problems += _value_problems(run, groups)
    if problems:
        raise ChipspanError(_all_of(problems))
    notices = [_lf09_notice(lf09_keys, lf09_defaults, run, command)] if lf09_keys else []
    if idle:
        notices.append("no effect here: " + "; ".join(f"{', '.join(keys)} ({why})" for why, keys in idle.items()))
    return dataclasses.replace(run, notices=tuple(f"note: {line}" for line in notices))


def _sort_keys(values: Mapping[str, Any], flags: Mapping[str, Any]) -> tuple[dict, list[str], dict[str, list[str]]]:
    """(chipspan flag -> raw value, problems, reason -> keys without effect) for the keys of ``values``,
    read as lf_keys says: renamed and converted keys become flags, off values of refused keys pass."""
    settings: dict[str, Any] = {}
    problems: list[str] = []
    idle: dict[str, list[str]] = {}
    added: dict[str, list[str]] = {}  # comma-list flag -> words keys add to it (use_swanlab: report_to swanlab)
    for key, raw in values.items():
        name = ALIASES.get(key, key)
        converted = lf_keys.CONVERTED.get(key, {}).get(lf_keys.spelled(raw))
        if name in flags:
            settings[name] = raw
        elif converted and getattr(flags[converted[0]][1].metadata.get("choices"), "comma_list", False):
            added.setdefault(converted[0], []).append(converted[1])
        elif converted:
            settings[converted[0]] = converted[1]
        elif key in lf_keys.REFUSED and not lf_keys.REFUSED[key].allows(raw):
            value = lf_keys.spelled(raw) if isinstance(raw, bool) else shown(raw)
            problems.append(f"--{key} {value}: {lf_keys.REFUSED[key].reason}")
        elif key in lf_keys.IDLE:
            idle.setdefault(lf_keys.IDLE[key], []).append(key)
        elif key not in lf_keys.REFUSED:
            problems.append(_unknown_flag_message(key, flags))
    for name, words in added.items():
        settings[name] = _with_words(settings.get(name), words)
    return settings, problems, idle


def _with_words(raw: Any, words: list[str]) -> Any:
    """A comma-list setting (text, a YAML list, or None: unset) with ``words`` added; ``none`` gives way
    to them, ``all`` holds them already."""
    named = raw if isinstance(raw, list) else [] if raw is None else str(raw).split(",")
    named = [str(word).strip() for word in named if str(word).strip() not in ("", "none")]
    return "all" if "all" in named else ",".join(dict.fromkeys(named + words))


def _all_of(problems: list[str]) -> str:
    """One line for every problem: the problem itself, or "3 problems: (1) ...; (2) ...; (3) ..."."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))


def _lf09_notice(keys: list[str], defaults: Mapping[str, Any], run: RunArguments, command: str) -> str:
    """The line saying the run reads as LLaMA-Factory 0.9's, and which of 0.9's defaults matter to it."""
    training = command == "train"  # export, chat and api read the template and their own flags
    matters = {
        "cutoff_len": training,
        "lora_target": training and run.finetuning.finetuning_type == "lora",
        "num_layer_trainable": training and run.finetuning.finetuning_type == "freeze",
        "name_module_trainable": training and run.finetuning.finetuning_type == "freeze",
        "max_new_tokens": command in ("chat", "api") or (training and run.training.do_predict),
        "export_size": command == "export",
    }
    shown_keys = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    applied = ", ".join(f"{name} {value}" for name, value in defaults.items() if matters.get(name, True))
    return f"settings of LLaMA-Factory 0.9 ({shown_keys})" + (
        f": its defaults apply to what the run leaves out: {applied}" if applied else ""
    )


def _value_problems(run: RunArguments, groups: tuple[tuple[str, type], ...]) -> list[str]:
    """One line for each setting outside its field's range (NaN and infinity never are) or choices,
    or a --chip_memory that is not a positive size."""
    problems = []
    for group, cls in groups:
        settings = getattr(run, group)
        for f in dataclasses.fields(cls):
            value = getattr(settings, f.name)
            if "refused" in f.metadata and value != f.default:
                problems.append(f"--{f.name} {shown(value)}: {f.metadata['refused']}")
                continue
            if value is None or isinstance(value, bool):
                continue
            try:
                if isinstance(value, str):
                    if f.metadata.get("size"):
                        _check_size(f.name, value)
                    if "choices" in f.metadata:
                        check_choice(f.name, value, f.metadata["choices"])
                    continue
                check_range(f.name, value, f.metadata.get("range", Range()), f.default)
            except ChipspanError as exc:
                problems.append(str(exc))
    return problems


def check_choice(name: str, value: str, allowed: Choices) -> None:
    """ChipspanError unless ``allowed`` holds flag ``name``'s ``value`` (each item of a comma list),
    e.g. "--eval_strategy step is not one of no, steps, epoch; did you mean 'steps'?"."""
    items = [item.strip() for item in value.split(",") if item.strip()] if allowed.comma_list else [value]
    if allowed.comma_list and items == ["all"]:
        return
    wrong = next((item for item in items if item not in allowed.words), None if items else value)
    if wrong is None:
        return
    if wrong in lf_keys.OTHER_CHOICES.get(name, {}):
        raise ChipspanError(f"--{name} {shown(wrong)}: {lf_keys.OTHER_CHOICES[name][wrong]}")
    close = difflib.get_close_matches(wrong, allowed.words, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    shown_value = shown(value) if wrong == value else f"{shown(value)}: '{shown(wrong)}'"
    raise ChipspanError(f"--{name} {shown_value} is not {allowed.describe()}{hint}")


def check_range(name: str, value: float, allowed: Range, default: float | None = None) -> None:
    """ChipspanError unless ``allowed`` admits flag ``name``'s ``value``, e.g. "--learning_rate inf:
    must be a finite number > 0 (e.g. 5e-05)" (the example: the range's, else ``default``)."""
    if allowed.admits(value):
        return
    kind = "a whole number" if isinstance(value, int) else "a finite number"
    words = " ".join(filter(None, (kind, allowed.describe())))
    example = allowed.example or (None if default is None else _number(default))
    raise ChipspanError(f"--{name} {shown(value)}: must be {words}" + (f" (e.g. {example})" if example else ""))


def _check_size(name: str, value: str) -> None:
    from chipspan.models.weights import parse_size

    try:
        size = parse_size(value)
    except OverflowError:
        size = -1
    if size <= 0:
        raise ChipspanError(f"--{name} {shown(value)}: must be a size above 0, e.g. 16GiB or 500MB")


def _collect(argv: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            name, eq, inline = token[2:].partition("=")
            name = name.replace("-", "_")
            if eq:
                values[name] = inline
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and not _is_bool_flag(name):
                values[name] = argv[i + 1]
                i += 1
            elif i + 1 < len(argv) and _is_bool_flag(name) and argv[i + 1].lower() in _BOOLEANS:
                values[name] = argv[i + 1]
                i += 1
            else:
                values[name] = True
        elif token.endswith((".yaml", ".yml")) and "=" not in token:
            values.update(_read_yaml(Path(token)))
        elif "=" in token:
            name, _, value = token.partition("=")
            values[name.replace("-", "_")] = value
        else:
            raise ChipspanError(
                f"cannot read argument '{token}': write flags as --name value, key=value, or name a .yaml file"
            )
        i += 1
    return values


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _is_bool_flag(name: str) -> bool:
    flags = {**known_flags(), **known_flags("export")}
    return name in flags and flags[name][2] is bool


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ChipspanError(f"run file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ChipspanError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ChipspanError(f"{path} must hold a mapping of flag names to values")
    return data


def environment_device(environ: Mapping[str, str]) -> str | None:
    """The device LLaMA-Factory 0.5's variables ask for: tpu under USE_SOPHGO=1, else None."""
    return "tpu" if environ.get("USE_SOPHGO", "0") not in ("", "0") else None


def _sophgo_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """LLaMA-Factory 0.5's chip variables as flags: USE_SOPHGO=1 -> device tpu; SOPHGO_SPLIT=N, CHIPS=K -> K..K+N-1."""
    values: dict[str, Any] = {}
    device = environment_device(environ)
    if device:
        values["device"] = device
    split, first = environ.get("SOPHGO_SPLIT"), environ.get("CHIPS")
    if split is not None or first is not None:
        try:
            count, start = int(split or 1), int(first or 0)
        except ValueError:
            raise ChipspanError(
                f"SOPHGO_SPLIT={split!r} and CHIPS={first!r} must be whole numbers (chips to span, first chip id)"
            ) from None
        if count < 1 or start < 0:
            raise ChipspanError(f"SOPHGO_SPLIT must be >= 1 and CHIPS >= 0 (got {count} and {start})")
        values["chips"] = f"{start}-{start + count - 1}"
    return values


def _convert(name: str, raw: Any, kind: Any) -> Any:
    optional = type(None) in getattr(kind, "__args__", ())
    base = next((t for t in getattr(kind, "__args__", (kind,)) if t is not type(None)), kind)
    if raw is None or (optional and isinstance(raw, str) and raw.lower() in ("none", "null")):
        if optional:
            return None
        raise ChipspanError(f"--{name} needs a value")
    if base is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in _BOOLEANS:
            return _BOOLEANS[str(raw).lower()]
        raise ChipspanError(f"--{name} takes true or false, not '{raw}'")
    if base is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if re.fullmatch(r"\s*-?\d{1,100}\s*", str(raw)):
            return int(raw)
        raise ChipspanError(f"--{name} takes a whole number, not '{shown(raw)}'")
    if base is float:
        try:
            if isinstance(raw, (bool, list, dict)):
                raise TypeError
            return float(raw)
        except (TypeError, ValueError, OverflowError):
            raise ChipspanError(f"--{name} takes a number, not '{shown(raw)}'") from None
    if isinstance(raw, bool):
        raise ChipspanError(f"--{name} needs a value")
    if isinstance(raw, (list, dict)):
        raise ChipspanError(f"--{name} takes text, not a {type(raw).__name__}: '{shown(raw)}'")
    return str(raw)


def _unknown_flag_message(name: str, flags: Mapping[str, Any]) -> str:
    """ "unknown flag --x", with the one flag (or LLaMA-Factory key) spelled almost the same, if any."""
    keys = [*flags, *lf_keys.RENAMED, *lf_keys.IDLE, *lf_keys.REFUSED]
    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.85)
    hint = f" (did you mean --{close[0]}?)" if close else " (`chipspan train --help` lists the flags)"
    return f"unknown flag --{name}{hint}"


def flags_help(command: str = "train") -> str:
    """Every flag of ``command`` (`chipspan train`'s by default), grouped, with its default and meaning."""
    lines = [
        f"usage: chipspan {command} [run.yaml] [key=value ...] [--flag value ...]",
        "chips also from the environment: USE_SOPHGO=1 (device tpu), SOPHGO_SPLIT=N, CHIPS=K",
        "other names: " + ", ".join(f"--{old} = --{new}" for old, new in ALIASES.items()),
    ]
    for group, cls in _groups(command):
        lines.append(f"\n{group}:")
        for f in dataclasses.fields(cls):
            allowed = f.metadata.get("range") or f.metadata.get("choices")
            limits = f"; {allowed.describe()}" if allowed else ""
            lines.append(f"  --{f.name:<34} {f.metadata.get('help', '')} (default: {f.default}{limits})")
    return "\n".join(lines)
