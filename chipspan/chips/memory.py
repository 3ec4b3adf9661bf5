"""Predicted peak memory of one training step on each chip, before any weight is loaded.

Everything is in bytes. ``estimate`` prices one chip's share of the model (a contiguous run of
decoder layers, plus the embeddings on the first chip and the final norm, head and loss on the
last); ``pack_layers`` / ``min_chips`` find how few chips of a given size hold a job, and
``balanced_split`` spreads a job over a given number of chips so the fullest chip is as empty as
possible. The formulas, their sources and what they leave out are in docs/plan.md.

The job's knobs (``estimate``'s keyword arguments) are:

- ``finetuning_type``: "lora", "full" or "freeze".
- ``base_dtype_bytes``: bytes per element of the compute dtype: 2 under --fp16/--bf16 (a frozen
  fp16/bf16 base, 16-bit activations), 4 in fp32. Trained parameters are fp32 whatever it is.
- ``seq_len``, ``batch``: tokens per example (cutoff_len) and examples per micro-batch.
- ``gradient_checkpointing``: keep only each layer's input and recompute the rest in backward.
- ``lora_rank``, ``lora_targets``: the adapters ("all": every linear layer).
- ``micro_batches_in_flight``: micro-batches whose activations a chip holds at once (GPipe: all m
  of them; 1F1B: at most the number of stages).
- ``num_layer_trainable``, ``name_module_trainable``: what "freeze" trains, as in ``train``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig
from chipspan.models.loss import LOGITS_CHUNK_ELEMENTS
from chipspan.train.finetune import FINETUNING_TYPES, freeze_layers, freeze_modules

TRAINED_BYTES = 4  # trained parameters are fp32
GRADIENT_BYTES = 4  # fp32 gradient per trained parameter
ADAMW_BYTES = 8  # AdamW's two fp32 moments per trained parameter
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GIB = 1 << 30


@dataclass(frozen=True)
class ChipMemory:
    """One chip's predicted peak, in bytes, by what holds it."""

    layers: range  # decoder layers on this chip
    weights: int  # frozen and trained parameters (and autocast's 16-bit copies of trained ones)
    gradients: int  # fp32 gradients of trained parameters
    optimizer: int  # AdamW moments
    activations: int  # saved for backward by the decoder layers, all micro-batches in flight
    logits: int  # final norm, head and loss (last chip only)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def estimate(config: ModelConfig, layers: range, first: bool, last: bool, *, finetuning_type: str,
             base_dtype_bytes: int, seq_len: int, batch: int, gradient_checkpointing: bool,
             lora_rank: int = 8, lora_targets: tuple[str, ...] = ("q_proj", "v_proj"),
             micro_batches_in_flight: int = 1, num_layer_trainable: int = 3,
             name_module_trainable: str = "mlp") -> ChipMemory:
    """Peak bytes of one chip holding ``layers`` (and the embeddings if ``first``, the final norm,
    head and loss if ``last``; a chip both first and last holds the whole model)."""
    if finetuning_type not in FINETUNING_TYPES:
        raise ChipspanError(f"finetuning_type must be one of {', '.join(FINETUNING_TYPES)}, not '{finetuning_type}'")
    if base_dtype_bytes not in (2, 4):
        raise ChipspanError(f"base_dtype_bytes must be 2 (fp16/bf16) or 4 (fp32), not {base_dtype_bytes}")
    if min(seq_len, batch, micro_batches_in_flight) < 1:
        raise ChipspanError("seq_len, batch and micro_batches_in_flight must be at least 1")
    num_layers = config.num_hidden_layers
    if not layers or layers.start < 0 or layers.stop > num_layers or layers.step != 1:
        raise ChipspanError(f"a chip must hold a contiguous, non-empty run of layers 0-{num_layers - 1}, not {layers}")

    h, cb, m = config.hidden_size, base_dtype_bytes, micro_batches_in_flight
    embed = config.vocab_size * h
    params = len(layers) * config.parameters_per_layer
    params += embed if first else 0
    if last:
        params += h + (embed if not config.tie_word_embeddings or not first else 0)

    if finetuning_type == "full":
        trained, extra = params, 0
        grad_path = layers
    elif finetuning_type == "lora":
        trained, extra = 0, len(layers) * _lora_parameters_per_layer(config, lora_rank, lora_targets)
        grad_path = layers
    else:
        trainable = freeze_layers(num_layers, num_layer_trainable)
        per_layer = _freeze_parameters_per_layer(config, name_module_trainable)
        trained, extra = per_layer * len(set(layers) & set(trainable)), 0
        grad_path = range(max(layers.start, trainable.start), layers.stop)
    trained_total = trained + extra
    weights = (params - trained) * cb + trained_total * TRAINED_BYTES
    if cb < TRAINED_BYTES:  # autocast's 16-bit copies of fp32 weights, saved for backward
        weights += trained_total * cb

    activations = 0
    if grad_path:
        layer = _layer_activation_bytes(config, seq_len, batch, cb)
        if gradient_checkpointing:
            activations = len(grad_path) * m * seq_len * batch * h * cb + layer
        else:
            activations = len(grad_path) * m * layer
    return ChipMemory(layers=layers, weights=weights, gradients=trained_total * GRADIENT_BYTES,
                      optimizer=trained_total * ADAMW_BYTES, activations=activations,
                      logits=_loss_bytes(config, seq_len, batch, cb, m) if last else 0)


def pack_layers(config: ModelConfig, chip_bytes: int, usable_fraction: float = 1.0, **job) -> list[range]:
    """The in-order greedy packer: each chip, from the first, takes as many layers as fit in
    ``chip_bytes * usable_fraction``; the last chip must also fit the norm, head and loss.
    Under this memory model it uses the fewest chips possible. ``job``: ``estimate``'s knobs."""
    budget = int(chip_bytes * usable_fraction)
    num_layers = config.num_hidden_layers

    def fits(start: int, stop: int) -> bool:
        return estimate(config, range(start, stop), start == 0, stop == num_layers, **job).total <= budget

    slices, start = [], 0
    while not fits(start, num_layers):
        stop = start
        while stop + 1 < num_layers and fits(start, stop + 1):  # leave a layer for the last chip
            stop += 1
        if stop == start:
            raise ChipspanError(_too_small(config, budget, len(slices), job))
        slices.append(range(start, stop))
        start = stop
    slices.append(range(start, num_layers))
    return slices


def min_chips(config: ModelConfig, chip_bytes: int, usable_fraction: float = 1.0, **job) -> int:
    """The fewest chips of ``chip_bytes`` (times ``usable_fraction``) that hold the job."""
    return len(pack_layers(config, chip_bytes, usable_fraction, **job))


def balanced_split(config: ModelConfig, num_chips: int, **job) -> list[range]:
    """Contiguous layer slices over ``num_chips`` chips that minimize the largest predicted
    per-chip total; among those, the one with the fewest layers on its busiest chip."""
    num_layers = config.num_hidden_layers
    if not 1 <= num_chips <= num_layers:
        raise ChipspanError(f"cannot span {num_layers} decoder layers over {num_chips} chips: use 1 to "
                            f"{num_layers} chips (each holds at least one layer)")

    @cache
    def total(start: int, stop: int) -> int:
        return estimate(config, range(start, stop), start == 0, stop == num_layers, **job).total

    fullest = max(total(r.start, r.stop) for r in _min_max_split(num_layers, num_chips, total))
    return _min_max_split(num_layers, num_chips,
                          lambda start, stop: stop - start if total(start, stop) <= fullest else float("inf"))


def _min_max_split(num_layers: int, num_chips: int, cost) -> list[range]:
    """Contiguous split of layers into ``num_chips`` non-empty slices minimizing the largest
    ``cost(start, stop)`` (dynamic programming over chips and layers)."""
    # best[c][j]: (smallest largest cost, cut) splitting layers [0, j) over c chips
    best = [dict() for _ in range(num_chips + 1)]
    best[0][0] = (float("-inf"), 0)
    for chips in range(1, num_chips + 1):
        for stop in range(chips, num_layers - (num_chips - chips) + 1):
            best[chips][stop] = min((max(best[chips - 1][start][0], cost(start, stop)), start)
                                    for start in best[chips - 1] if start < stop)
    slices, stop = [], num_layers
    for chips in range(num_chips, 0, -1):
        start = best[chips][stop][1]
        slices.append(range(start, stop))
        stop = start
    return slices[::-1]


def _layer_activation_bytes(config: ModelConfig, seq_len: int, batch: int, dtype_bytes: int) -> int:
    """Bytes one decoder layer saves for backward, no recomputation: s·b·h·(34 + 5·a·s/h) at
    16-bit (Korthikanti et al. 2022), scaled by dtype_bytes / 2."""
    h, a = config.hidden_size, config.num_attention_heads
    return seq_len * batch * (34 * h + 5 * a * seq_len) * dtype_bytes // 2


def _loss_bytes(config: ModelConfig, seq_len: int, batch: int, dtype_bytes: int, in_flight: int) -> int:
    """Final norm and chunked loss (chipspan.models.loss): per micro-batch in flight the norm's fp32
    copies, its output, the gathered hidden states and their gradient (s·b·h·(8 + 3·dtype_bytes));
    once, one chunk of logits: fp32, plus the 16-bit matmul output and d_logits under autocast."""
    tokens, vocab = seq_len * batch, config.vocab_size
    saved = in_flight * tokens * config.hidden_size * (8 + 3 * dtype_bytes)
    chunk = min(tokens, max(1, LOGITS_CHUNK_ELEMENTS // vocab)) * vocab
    return saved + chunk * (4 + (2 * dtype_bytes if dtype_bytes < 4 else 0))


def _lora_parameters_per_layer(config: ModelConfig, rank: int, targets: tuple[str, ...]) -> int:
    """Adapter parameters of one layer: rank · (in + out) per adapted linear layer."""
    h, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    names = LORA_MODULES if tuple(targets) == ("all",) else tuple(targets)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ChipspanError(f"lora target '{unknown[0]}' is not a linear layer of a {config.model_type} decoder; "
                            f"choose from {', '.join(LORA_MODULES)} or all")
    return sum(rank * sum(shapes[n]) for n in names)


def _freeze_parameters_per_layer(config: ModelConfig, modules: str) -> int:
    """Trained parameters of one trainable layer under "freeze" (mlp, self_attn, or all)."""
    h, inter = config.hidden_size, config.intermediate_size
    mlp = 3 * h * inter + (2 * inter + h if config.mlp_bias else 0)
    sizes = {"mlp": mlp, "self_attn": config.parameters_per_layer - mlp - 2 * h}
    return sum(sizes[n] for n in freeze_modules(modules))


def _too_small(config: ModelConfig, budget: int, chip: int, job: dict) -> str:
    """One line: which chip overflows, and the smallest usable memory that holds the job."""
    num_layers = config.num_hidden_layers
    need = max(estimate(config, range(i, i + 1), i == 0, i == num_layers - 1, **job).total
               for i in range(num_layers))
    return (f"chip {chip} cannot fit one decoder layer in {budget / GIB:.2f} GiB usable: this job "
            f"needs at least {need / GIB:.2f} GiB usable per chip (one layer per chip over {num_layers} chips); "
            "use chips with more memory, LoRA, gradient checkpointing, or a smaller batch or cutoff_len")
