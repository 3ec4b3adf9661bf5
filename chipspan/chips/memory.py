"""Predicted peak memory of one training step on each chip, before any weight is loaded.

Everything is in bytes. ``estimate`` prices one chip's share of the model (a contiguous run of
decoder layers, plus the embeddings on the first chip and the final norm, head and loss on the
last); ``pack_layers`` / ``min_chips`` find how few chips of a given size hold a job, and
``balanced_split`` spreads a job over a given number of chips so the fullest chip is as empty as
possible. The formulas, their sources and what they leave out are in docs/plan.md.

The job (``chipspan.chips.job.Job``: the finetuning type, the bytes of each dtype, tokens per
micro-batch, recomputation, what trains) is built once from the run's arguments and its precision
(``job_of``); the split functions take a ``Schedule`` besides, which gives each pipeline stage its
own micro-batches in flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

import torch

from chipspan.adapters.freeze import freeze_layers, freeze_modules
from chipspan.chips.job import Job
from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig
from chipspan.models.loss import LOGITS_CHUNK_ELEMENTS
from chipspan.optim.adamw import state_bytes_of, step_scratch_bytes
from chipspan.optim.offload import host_bytes_of
from chipspan.quant import dequantize_chunk_bytes, quantized_bytes_of

FP32 = 4  # what the norms, attention's log-sum-exp and the loss compute in, whatever the job's dtypes
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES = LORA_MODULES[:4]
MLP_MODULES = LORA_MODULES[4:]
GIB = 1 << 30
VIRTUAL_STAGES = {"gpipe": 1, "1f1b": 1, "interleaved1f1b": 2}  # pipeline stages per chip, by schedule


@dataclass(frozen=True)
class Schedule:
    """The order micro-batches run through the pipeline stages, and so how many micro-batches'
    activations each stage keeps at once.

    ``micro_batches``: micro-batches per pass (one process: per batch; one process per chip: per
    optimizer step, batch micro-batches × gradient accumulation steps). ``name``:

    - "gpipe": every forward before any backward: all of them on every stage;
    - "1f1b": stage s of S starts its backwards after S - s forwards: min(micro_batches, S - s);
    - "interleaved1f1b": each chip runs ``virtual`` stages (s, s + P, …; P = S / virtual chips) and
      counts the forwards torch's schedule runs before the chip's first backward: its warm-up,
      (virtual - 1)·round + 2·(P - 1 - chip) chunks (round = P micro-batches) plus one, taken
      round by round from its stages in turn.
    """

    name: str = "gpipe"
    micro_batches: int = 1

    @property
    def virtual(self) -> int:
        return VIRTUAL_STAGES[self.name]

    def in_flight(self, stage: int, num_stages: int) -> int:
        """Micro-batches whose activations ``stage`` (of ``num_stages``) holds at its fullest."""
        m = self.micro_batches
        if self.name == "gpipe":
            return m
        if self.name == "1f1b":
            return min(m, num_stages - stage)
        chips = num_stages // self.virtual
        chip, local = stage % chips, stage // chips
        per_round = m // max(1, m // chips)
        forwards = min((self.virtual - 1) * per_round + 2 * (chips - 1 - chip) + 1, m * self.virtual)
        return max(1, sum(1 for j in range(forwards) if (j // per_round) % self.virtual == local))


@dataclass(frozen=True)
class ChipMemory:
    """One chip's predicted memory, in bytes, by what holds it, and its peak (``total``).

    The columns are not summed: ``total`` is the largest of the step's moments (see ``estimate``),
    and ``peak_at`` says which one it is.
    """

    layers: range  # decoder layers on this chip
    weights: int  # frozen parameters in the base dtype, trained ones in theirs
    gradients: int  # gradients of trained parameters
    optimizer: int  # AdamW's two moments
    activations: int  # saved for backward at the end of the forward pass, all micro-batches in flight
    logits: int  # last chip: the loss's working set (final norm output, one chunk of logits)
    workspace: int  # the transient at the peak moment: a layer's backward, or AdamW's temporaries
    total: int  # the predicted peak
    peak_at: str  # "forward" (the loss), "backward" or "optimizer step"
    in_flight: int = 1  # micro-batches whose activations it holds at once
    host: int = 0  # host memory for this chip's trained weights (--offload_optimizer), beside the chip


def estimate(config: ModelConfig, layers: range, first: bool, last: bool, job: Job) -> ChipMemory:
    """Peak bytes of one chip holding ``layers`` (and the embeddings if ``first``, the final norm,
    head and loss if ``last``; a chip both first and last holds the whole model).

    The peak is the largest of four moments of a steady-state step (AdamW's moments exist):

    - forward, in the loss (last chip): every activation saved, plus the loss's working set;
    - backward, first layer out: every activation saved, plus one layer's backward working set
      (and, last chip, the head's gradient);
    - backward, last layer out: every gradient, one layer's activations and working set;
    - optimizer step: every gradient, plus AdamW's foreach temporaries.

    With ``job.gradients_held`` the gradients of earlier micro-batches are alive in the first two
    moments too: gradient accumulation, or a 1F1B stage that runs forwards after backwards.

    With ``job.optimizer_in_backward`` there is no optimizer step apart: backward holds, beside every
    activation, one gradient at a time (the head's or a layer's, with its step's scratch) and a
    tied embedding's head gradient, which waits for the embedding's (on the first chip, last).
    """
    num_layers = config.num_hidden_layers
    if not layers or layers.start < 0 or layers.stop > num_layers or layers.step != 1:
        raise ChipspanError(f"a chip must hold a contiguous, non-empty run of layers 0-{num_layers - 1}, not {layers}")

    h, finetuning_type = config.hidden_size, job.finetuning_type
    embed = config.vocab_size * h
    params = len(layers) * config.parameters_per_layer
    params += embed if first else 0
    head_here = last and (not config.tie_word_embeddings or not first)
    params += (h + (embed if head_here else 0)) if last else 0

    if finetuning_type == "full":
        trained, extra = params, 0
        trained_layers, grad_path = layers, layers
        decay = trained - len(layers) * 2 * h - (h if last else 0)  # norm weights take no weight decay
    elif finetuning_type == "lora":
        trained, extra = 0, len(layers) * _lora_parameters_per_layer(config, job.lora_rank, job.lora_targets)
        trained_layers, grad_path = range(0), layers
        decay = extra
    else:
        trainable = freeze_layers(num_layers, job.num_layer_trainable)
        per_layer = _freeze_parameters_per_layer(config, job.name_module_trainable)
        trained_layers = range(max(layers.start, trainable.start), min(layers.stop, trainable.stop))
        trained, extra = per_layer * len(trained_layers), 0
        grad_path = range(max(layers.start, trainable.start), layers.stop)
        decay = trained
    trained_total = trained + extra
    full, in_flight = finetuning_type == "full", job.micro_batches_in_flight

    weights = (params - trained) * job.base_bytes + trained_total * job.trained_bytes
    if job.quant is not None:  # LoRA's frozen decoder linears, quantized
        weights -= len(layers) * _quantized_savings_per_layer(config, job)
    gradients, optimizer = trained_total * job.gradient_bytes, _moment_bytes(job, trained_total)
    largest = _largest_trained(config, job, full and (first or head_here))
    states = weights + optimizer  # alive all step long

    activations, backward, backward_end, forward = 0, 0, 0, 0
    if grad_path:
        # no gradient enters the first layer after a frozen embedding or frozen layers
        gradless = 0 if finetuning_type == "lora" else (-1 if full else max(trainable.start, 0))
        saved = {
            (trained_here, input_grad): (count, _layer_saved_bytes(config, job, trained_here, input_grad=input_grad))
            for (trained_here, input_grad), count in _layer_kinds(grad_path, trained_layers, gradless).items()
        }
        if job.gradient_checkpointing:  # each layer keeps its input; backward recomputes one at a time
            activations = len(grad_path) * in_flight * job.tokens * h * job.base_bytes
            backward = max(each for _, each in saved.values())
        else:
            activations = in_flight * sum(count * each for count, each in saved.values())
        activations += in_flight * _rope_bytes(config, job)
        backward += _layer_backward_bytes(config, job, trained=bool(trained_layers))
        # the chip's first layer, attention half: its MLP half and every other layer are done
        backward_end = _layer_saved_bytes(
            config, job, grad_path.start in trained_layers, "attention", grad_path.start != gradless
        ) + _attention_backward_bytes(config, job)
        forward = _adapter_forward_bytes(config, job)
        backward += _dequantize_bytes(config, job)
        forward += _dequantize_bytes(config, job)
    if len(grad_path) < len(layers):  # layers before the gradient path run forward before any saving
        forward = max(forward, _forward_bytes(config, job) + _dequantize_bytes(config, job) - activations)
    loss_saved = in_flight * _loss_saved_bytes(config, job) if last else 0
    logits = _loss_working_bytes(config, job) if last else 0
    head_gradient = embed * job.gradient_bytes if (last and full and head_here) else 0
    embed_gradient = embed * job.gradient_bytes if (first and full and not job.gradients_held) else 0

    step = _adamw_step_bytes(job, decay, largest)
    if job.optimizer_in_backward:  # each gradient steps and goes as soon as it is complete
        # an untied head's gradient comes first and steps at once, then each layer's in turn, the
        # embedding's last, when the activations are gone; a tied embedding's head (or its head
        # copy, on the last chip) keeps its gradient until the embedding's has joined it
        tied = embed * job.gradient_bytes if (last and full and config.tie_word_embeddings) else 0
        head_now = 0 if config.tie_word_embeddings else head_gradient
        linear = _largest_trained(config, job, embeddings_trained=False)
        layer_step = _adamw_step_bytes(job, decay, linear)
        gradients = max(head_now, embed_gradient, tied + linear * job.gradient_bytes)
        moments = {
            "forward": states + activations + max(loss_saved + logits, forward),
            "backward": max(
                states + activations + head_now + step,
                states + activations + tied + backward + layer_step,
                states + max(embed_gradient, tied) + step,
            ),
        }
        workspace = {"forward": max(logits, forward), "backward": moments["backward"] - states - activations}
    else:
        held = gradients if job.gradients_held else 0
        moments = {
            "forward": states + held + activations + max(loss_saved + logits, forward),
            "backward": max(
                states + held + activations + (0 if job.gradients_held else head_gradient) + backward,
                states + gradients - embed_gradient + backward_end,  # the embeddings' gradient comes last
                states + gradients,
            ),
            "optimizer step": states + gradients + step,
        }
        workspace = {"forward": max(logits, forward), "backward": backward, "optimizer step": step}
    peak_at = max(moments, key=moments.get)
    workspace = workspace[peak_at]
    return ChipMemory(
        layers=layers,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations + loss_saved,
        logits=logits,
        workspace=workspace,
        total=moments[peak_at],
        peak_at=peak_at,
        in_flight=in_flight,
        host=host_bytes_of(trained_total) if job.offload_optimizer else 0,
    )


def _layer_kinds(grad_path: range, trained: range, gradless: int) -> dict[tuple[bool, bool], int]:
    """How many layers of ``grad_path`` are of each kind (trained, whose input carries a gradient):
    the counts of ``(i in trained, i != gradless) for i in grad_path``, without a loop over layers."""
    overlap = len(range(max(grad_path.start, trained.start), min(grad_path.stop, trained.stop)))
    counts = {(True, True): overlap, (False, True): len(grad_path) - overlap}
    if gradless in grad_path:
        kind = gradless in trained
        counts[(kind, True)] -= 1
        counts[(kind, False)] = 1
    return {kind: count for kind, count in counts.items() if count}


def split_estimates(
    config: ModelConfig, split: list[range], job: Job, schedule: Schedule | None = None
) -> list[ChipMemory]:
    """``estimate`` for each stage of ``split`` (contiguous layer slices, first to last); with a
    ``schedule``, each stage holds the micro-batches it keeps in flight."""
    last = config.num_hidden_layers
    return [
        estimate(config, r, r.start == 0, r.stop == last, _stage_job(job, schedule, i, len(split)))
        for i, r in enumerate(split)
    ]


def _stage_job(job: Job, schedule: Schedule | None, stage: int, num_stages: int) -> Job:
    """``job`` for one stage: the micro-batches it holds, and whether gradients are alive while
    it holds them (it runs more micro-batches than it holds at once)."""
    if schedule is None:
        return job
    flight = schedule.in_flight(stage, num_stages)
    held = job.gradients_held or (schedule.name != "gpipe" and flight < schedule.micro_batches)
    return replace(job, micro_batches_in_flight=flight, gradients_held=held)


def pack_layers(config: ModelConfig, job: Job, chip_bytes: int, usable_fraction: float = 1.0) -> list[range]:
    """The in-order greedy packer: each chip, from the first, takes as many layers as fit in
    ``chip_bytes * usable_fraction``; the last chip must also fit the norm, head and loss.
    Under this memory model it uses the fewest chips possible."""
    budget = int(chip_bytes * usable_fraction)
    num_layers = config.num_hidden_layers

    def fits(start: int, stop: int) -> bool:
        return estimate(config, range(start, stop), start == 0, stop == num_layers, job).total <= budget

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


def min_chips(
    config: ModelConfig, job: Job, chip_bytes: int, usable_fraction: float = 1.0, schedule: Schedule | None = None
) -> int:
    """The fewest chips of ``chip_bytes`` (times ``usable_fraction``) that hold the job. Without a
    schedule (or under GPipe) every chip holds the same micro-batches and the greedy packer finds
    it; under 1F1B the early stages hold more, so from the packer's count (one micro-batch each: a
    lower bound) splits of more chips are tried, in growing steps until ``balanced_split``'s fits,
    then bisected (taking it that once some chips hold the job, more do too)."""
    if schedule is None or schedule.name == "gpipe":
        flight = job if schedule is None else replace(job, micro_batches_in_flight=schedule.micro_batches)
        return len(pack_layers(config, flight, chip_bytes, usable_fraction))
    budget = int(chip_bytes * usable_fraction)
    most = config.num_hidden_layers // schedule.virtual

    def fits(chips: int) -> bool:
        split = balanced_split(config, job, chips * schedule.virtual, schedule)
        return max(chip_totals(split_estimates(config, split, job, schedule), schedule)) <= budget

    chips = len(pack_layers(config, job, chip_bytes, usable_fraction))
    failed, step = chips - 1, 1
    while chips > most or not fits(chips):
        if chips >= most:
            raise ChipspanError(
                f"no split of the {config.num_hidden_layers} layers over up to {most} chips of "
                f"{budget / GIB:.2f} GiB usable holds this job under {schedule.name}: its first "
                f"stages keep up to {schedule.micro_batches} micro-batches' activations at once; "
                "run fewer micro-batches per step (--gradient_accumulation_steps, --micro_batches) "
                "or lower cutoff_len"
            )
        failed, chips, step = chips, min(chips + step, most), 2 * step
    while chips - failed > 1:
        middle = (failed + chips) // 2
        failed, chips = (failed, middle) if fits(middle) else (middle, chips)
    return chips


def chip_totals(stages: list[ChipMemory], schedule: Schedule | None = None) -> list[int]:
    """Each chip's predicted peak from its stages' (chip c runs stages c, c + P, …): under an
    interleaved schedule the sum of its stages' peaks, a bound from above."""
    virtual = 1 if schedule is None else schedule.virtual
    chips = len(stages) // virtual
    return [sum(stages[c + k * chips].total for k in range(virtual)) for c in range(chips)]


def balanced_split(config: ModelConfig, job: Job, num_chips: int, schedule: Schedule | None = None) -> list[range]:
    """Contiguous layer slices over ``num_chips`` chips (pipeline stages) that minimize the largest
    predicted per-chip total; among those, the one with the fewest layers on its busiest chip. With
    a ``schedule``, each stage holds the micro-batches it keeps in flight.

    Each bound is found by bisection over a greedy split (``_greedy_split``): the slices priced are
    O(chips · log(layers)) per bit of a byte count, never every (start, stop) pair. The greedy split
    is exact when every stage prices a slice alike (one process); under 1F1B, whose stages differ,
    it is an upper bound (on the tested jobs, the same as an exhaustive search).
    """
    num_layers = config.num_hidden_layers
    if not 1 <= num_chips <= num_layers:
        raise ChipspanError(
            f"cannot span {num_layers} decoder layers over {num_chips} chips: use 1 to "
            f"{num_layers} chips (each holds at least one layer)"
        )

    def total(chip: int, start: int, stop: int) -> int:
        return _total(start, stop, _stage_job(job, schedule, chip, num_chips))

    @cache  # stages that hold as much share their estimates
    def _total(start: int, stop: int, stage_job: Job) -> int:
        return estimate(config, range(start, stop), start == 0, stop == num_layers, stage_job).total

    def fullest(split: list[range]) -> int:
        return max(total(chip, r.start, r.stop) for chip, r in enumerate(split))

    def within(bound: int, longest: int = num_layers):
        return _greedy_split(
            num_layers,
            num_chips,
            lambda chip, start, stop: stop - start <= longest and total(chip, start, stop) <= bound,
        )

    best = within(math.inf)  # the last chip takes all but one layer for each chip before it
    low, high = 0, fullest(best)  # the smallest largest total lies in (low, high]
    while high - low > 1:
        split = within((low + high) // 2)
        low, high, best = (low, fullest(split), split) if split else ((low + high) // 2, high, best)
    bound = high
    low, high = 0, max(len(r) for r in best)  # the fewest layers on the busiest chip, within the bound
    while high - low > 1:
        split = within(bound, (low + high) // 2)
        low, high, best = (low, max(len(r) for r in split), split) if split else ((low + high) // 2, high, best)
    return best


def _greedy_split(num_layers: int, num_chips: int, fits) -> list[range] | None:
    """Each chip from the last takes the most layers that ``fits(chip, start, stop)`` allows, leaving
    one for each chip before it, the first chip the rest; None when a chip cannot take one layer or
    the first cannot take the rest. (From the last, as the later stages hold fewer micro-batches
    under 1F1B.) A slice that fits still fits without its first layer, so each chip's first layer
    is bisected: ``fits`` is asked O(chips · log(layers)) times."""
    slices, stop = [], num_layers
    for chip in range(num_chips - 1, 0, -1):
        low, start = chip - 1, stop  # [start, stop) fits (or is empty); [low, stop) does not, or leaves a chip none
        while start - low > 1:
            middle = (low + start) // 2
            low, start = (low, middle) if fits(chip, middle, stop) else (middle, start)
        if start == stop:
            return None
        slices.append(range(start, stop))
        stop = start
    if not fits(0, 0, stop):
        return None
    return [range(0, stop), *slices[::-1]]


# --- what one step saves and allocates, per term -------------------------------------------------
#
# N tokens per micro-batch, h hidden, i intermediate, q = heads * head_dim, k = kv_heads * head_dim,
# c the compute dtype's bytes, r the residual stream's bytes, V the vocabulary. Every count below
# is a tensor chipspan's code keeps (docs/plan.md lists them with their shapes).


def _layer_saved_bytes(
    config: ModelConfig, job: Job, trained: bool, half: str = "both", input_grad: bool = True
) -> int:
    """Bytes one decoder layer on the gradient path saves for backward, per micro-batch.

    ``half``: "attention" (the first norm, q/k/v/o and attention), "mlp" (the second norm and the
    MLP) or "both". ``input_grad``: whether the layer's input carries a gradient (not so for the
    first layer after a frozen embedding, or the first trained layer of "freeze"); without one a
    norm keeps nothing, and neither does a half with nothing trained in it. What is saved (docs/plan.md lists the tensors with their shapes):

    - each RMSNorm: its input in fp32 (4·N·h) and the inverse RMS (4·N); when its weight trains
      (full), also the normalized input (r·N·h);
    - attention (SDPA's fused kernel, no s×s scores): q, k, v and the output (c·N·(2q + 2k)), and
      the fp32 log-sum-exp per head and token (4·N·heads);
    - the SwiGLU MLP: gate output, its SiLU and the up output (3·c·N·i);
    - the inputs of linear layers whose weight or adapter trains (``_linear_inputs_saved``);
    - per LoRA adapter, its rank-wide middle (c·N·rank) and, under autocast, the 16-bit copies of
      A and B; under autocast, the 16-bit copy of each trained weight matrix (autocast's cache).
    """
    n, c = job.tokens, job.compute_bytes
    h, i, q, k = config.hidden_size, config.intermediate_size, _q_width(config), _kv_width(config)
    norm = FP32 * n * h + FP32 * n + (job.base_bytes * n * h if job.finetuning_type == "full" else 0)
    shapes, trained_modules, adapted_modules = _linear_shapes(config), _trained_modules(job), _adapted(config, job)
    parts = {
        "attention": (ATTENTION_MODULES, c * n * (2 * q + 2 * k) + FP32 * n * config.num_attention_heads),
        "mlp": (MLP_MODULES, 3 * c * n * i),
    }
    total = 0
    for name in ("attention", "mlp"):
        modules, kept = parts[name]
        trained_here = frozenset(m for m in modules if trained and m in trained_modules)
        adapted = [m for m in modules if m in adapted_modules]
        if not input_grad and not (trained_here or adapted):
            continue  # nothing here needs a gradient
        lora = sum(c * n * job.lora_rank + (c * job.lora_rank * sum(shapes[m]) if job.autocast else 0) for m in adapted)
        copies = c * sum(shapes[m][0] * shapes[m][1] for m in trained_here) if job.autocast else 0
        part = (
            (norm if input_grad else 0)
            + kept
            + _linear_inputs_saved(config, job, modules, trained_here)
            + lora
            + copies
        )
        total += part if half in (name, "both") else 0
        input_grad = True  # the residual stream now carries a gradient
    return total


def _linear_inputs_saved(config: ModelConfig, job: Job, modules: tuple[str, ...], trained: frozenset) -> int:
    """Inputs of ``modules`` (linear layers) kept for their weight or adapter gradients, in bytes.

    The seven linear layers read four tensors: the first norm's output (q, k, v), the attention
    output (o), the second norm's output (gate, up) and the SwiGLU product (down). In fp32 a tensor
    is kept once, however many layers read it (the attention output is kept by attention anyway:
    o_proj adds only a LoRA adapter's 16-bit copy). Under autocast a trained weight keeps the 16-bit
    copy autocast makes of its input (the input itself when it is already 16-bit, shared), and a
    LoRA adapter, which first takes its input to fp32, keeps a fresh 16-bit copy of its own.
    """
    n, c = job.tokens, job.compute_bytes
    h, i, q = config.hidden_size, config.intermediate_size, _q_width(config)
    adapted = _adapted(config, job)
    inputs = [
        (("q_proj", "k_proj", "v_proj"), h, job.base_bytes),
        (("o_proj",), q, c),
        (("gate_proj", "up_proj"), h, job.base_bytes),
        (("down_proj",), i, c),
    ]
    total = 0
    for readers, width, dtype_bytes in inputs:
        readers = [m for m in readers if m in modules]
        own, lora = [m for m in readers if m in trained], [m for m in readers if m in adapted]
        if readers == ["o_proj"]:  # the attention output, which attention already keeps
            own, lora = [], lora if job.autocast else []
        if not job.autocast:
            total += dtype_bytes * n * width if (own or lora) else 0
            continue
        if own:
            total += c * n * width * (1 if dtype_bytes == c else len(own))
        total += c * n * width * len(lora)
    return total


def _rope_bytes(config: ModelConfig, job: Job) -> int:
    """The rotary cos and sin tables (N, head_dim) each, in the stream's dtype, saved once per chip
    and micro-batch: every layer's q·cos and rotate(q)·sin keep the same two tensors."""
    return 2 * job.base_bytes * job.tokens * config.head_dim


def _layer_backward_bytes(config: ModelConfig, job: Job, trained: bool) -> int:
    """Transient bytes while a decoder layer starts its backward with its saved tensors held: the
    gradient arriving from above (r·N·h) and, in the MLP's product backward, the gradients of the
    product and of both its factors (3·c·N·i) — less the product itself (c·N·i) when the down
    projection kept it, since its backward, which runs first, has freed it by then. A trained down
    projection adds its weight gradient (in the trained dtype, kept as its ``.grad``), under
    autocast first 16-bit (c more) beside the product's gradient."""
    n, c = job.tokens, job.compute_bytes
    h, i = config.hidden_size, config.intermediate_size
    down_trained = trained and "down_proj" in _trained_modules(job)
    work = 3 * c * n * i
    if down_trained or "down_proj" in _adapted(config, job):
        work = 2 * c * n * i
    if down_trained:
        weight = h * i
        work = job.gradient_bytes * weight + max(work, c * n * i + (c * weight if job.autocast else 0))
    return job.base_bytes * n * h + work


def _attention_backward_bytes(config: ModelConfig, job: Job) -> int:
    """Transient bytes of a layer's attention backward: the gradients arriving and leaving (2·r·N·h)
    and those of q, k and v (c·N·(q + 2k))."""
    n = job.tokens
    return 2 * job.base_bytes * n * config.hidden_size + job.compute_bytes * n * (
        _q_width(config) + 2 * _kv_width(config)
    )


def _adapter_forward_bytes(config: ModelConfig, job: Job) -> int:
    """Transient bytes of a layer's forward on the gradient path, beyond what it saves: under
    autocast a LoRA adapter first takes its input to its own dtype, fp32 (4·N·in; the widest,
    down_proj's, beside the SwiGLU product c·N·i it reads), with the layer's input and residual
    (2·r·N·h)."""
    n, c = job.tokens, job.compute_bytes
    h, i = config.hidden_size, config.intermediate_size
    widest = max((_linear_shapes(config)[m][0] for m in _adapted(config, job)), default=0) if job.autocast else 0
    return 2 * job.base_bytes * n * h + c * n * i + job.trained_bytes * n * widest


def _forward_bytes(config: ModelConfig, job: Job) -> int:
    """Transient bytes of one decoder layer's forward that keeps nothing (off the gradient path):
    its input and the attention's output (2·r·N·h) and the MLP's gate, SiLU, up and product
    (4·c·N·i)."""
    n, c = job.tokens, job.compute_bytes
    return 2 * job.base_bytes * n * config.hidden_size + 4 * c * n * config.intermediate_size


def _loss_saved_bytes(config: ModelConfig, job: Job) -> int:
    """What the last chip's final norm and fused loss keep until backward, per micro-batch: the
    norm's fp32 input and inverse RMS (plus its normalized input when its weight trains), the
    hidden-state gradient the loss computes in its forward (r·N·h), and, when the head trains, the
    head's fp32 gradient (4·V·h)."""
    n = job.tokens
    h, vocab = config.hidden_size, config.vocab_size
    norm = FP32 * n * h + FP32 * n + (job.base_bytes * n * h if job.finetuning_type == "full" else 0)
    head = FP32 * vocab * h if job.finetuning_type == "full" else 0
    return norm + job.base_bytes * n * h + head


def _loss_working_bytes(config: ModelConfig, job: Job) -> int:
    """The fused loss's transient working set (chipspan.models.loss), once: the final norm's output
    and its scored rows (2·r·N·h), and one chunk of logits at its fullest: fp32 logits plus the
    same again inside ``logsumexp`` (8 bytes per logit), or later the fp32 logits, their gradient in
    the head's dtype and, when the head trains, the head-gradient product (c·V·h, plus its fp32
    copy when c is 16-bit) — and under autocast, a trained head's 16-bit copy."""
    n = job.tokens
    h, vocab = config.hidden_size, config.vocab_size
    chunk = min(n, max(1, LOGITS_CHUNK_ELEMENTS // vocab)) * vocab
    head_trained = job.finetuning_type == "full"
    head_bytes = job.trained_bytes if head_trained else job.base_bytes  # the head weight's dtype
    gradient_phase = chunk * (FP32 + (head_bytes if head_bytes < FP32 else 0))
    head_copy = 0
    if head_trained:
        gradient_phase += vocab * h * (job.compute_bytes + (FP32 if job.compute_bytes < FP32 else 0))
        head_copy = job.compute_bytes * vocab * h if job.autocast else 0  # autocast's 16-bit head
    return 2 * job.base_bytes * n * h + head_copy + max(2 * FP32 * chunk, gradient_phase)


def _adamw_step_bytes(job: Job, decay_parameters: int, largest: int) -> int:
    """The optimizer step's transient on the chip. torch's foreach AdamW (its default on
    accelerators) allocates sqrt(v) for every parameter of a group at once, in the moments' dtype:
    for each parameter of the largest group, the weight-decay group. chipspan's AdamW (8-bit
    moments, stochastic rounding, stepping in backward) steps one tensor at a time, a chunk of it at once
    (``step_scratch_bytes`` of the largest, ``largest`` elements). The host-offloaded AdamW steps on
    the host and writes each weight back in place: nothing on the chip."""
    if job.offload_optimizer:
        return 0
    if job.moment_bits == 8 or job.stochastic_rounding or job.optimizer_in_backward:
        dtype = torch.float32 if job.trained_bytes == 4 else torch.bfloat16
        return step_scratch_bytes(min(decay_parameters, largest), dtype, job.moment_bits, job.stochastic_rounding)
    return job.moment_bytes * decay_parameters


def _moment_bytes(job: Job, trained: int) -> int:
    """AdamW's two moments of ``trained`` elements on the chip: in the trained weights' dtype, in
    8 bits and a scale per block (taking every tensor as big enough to be quantized), or none (on
    the host)."""
    if job.offload_optimizer:
        return 0
    return state_bytes_of(trained, job.moment_bits, job.moment_bytes)


def _largest_trained(config: ModelConfig, job: Job, embeddings_trained: bool) -> int:
    """Elements of the largest trained tensor on a chip: the embeddings or head where they train
    (``embeddings_trained``), else a linear weight of a layer (LoRA: an adapter matrix)."""
    shapes = _linear_shapes(config).values()
    if job.finetuning_type == "lora":
        return job.lora_rank * max(max(shape) for shape in shapes)
    largest = max(inputs * outputs for inputs, outputs in shapes)
    return max(largest, config.vocab_size * config.hidden_size) if embeddings_trained else largest


def _quantized_savings_per_layer(config: ModelConfig, job: Job) -> int:
    """Bytes a decoder layer saves with its linear weights quantized (their biases stay as loaded)."""
    return sum(
        inputs * outputs * job.base_bytes - quantized_bytes_of(outputs, inputs, job.quant)
        for inputs, outputs in _linear_shapes(config).values()
    )


def _dequantize_bytes(config: ModelConfig, job: Job) -> int:
    """A quantized linear's transient in forward or backward: one chunk of dequantized rows and
    its product with the input (``dequantize_chunk_bytes``), for the widest input."""
    if job.quant is None:
        return 0
    return max(
        dequantize_chunk_bytes(inputs, job.compute_bytes, job.tokens, outputs)
        for inputs, outputs in _linear_shapes(config).values()
    )


def _q_width(config: ModelConfig) -> int:
    return config.num_attention_heads * config.head_dim


def _kv_width(config: ModelConfig) -> int:
    return config.num_key_value_heads * config.head_dim


def _linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of a decoder layer."""
    h, inter, q, kv = config.hidden_size, config.intermediate_size, _q_width(config), _kv_width(config)
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def _adapted(config: ModelConfig, job: Job) -> frozenset[str]:
    """The linear layers of a decoder layer that carry a LoRA adapter."""
    return frozenset(_lora_targets(config, job.lora_targets)) if job.finetuning_type == "lora" else frozenset()


def _trained_modules(job: Job) -> frozenset[str]:
    """The linear layers whose own weight trains, in a layer that trains."""
    if job.finetuning_type != "freeze":
        return frozenset(LORA_MODULES) if job.finetuning_type == "full" else frozenset()
    return frozenset(
        m
        for n in freeze_modules(job.name_module_trainable)
        for m in (ATTENTION_MODULES if n == "self_attn" else MLP_MODULES)
    )


def _lora_targets(config: ModelConfig, targets: tuple[str, ...]) -> tuple[str, ...]:
    """The adapted linear layers' names; ChipspanError for a name that is not one."""
    names = LORA_MODULES if tuple(targets) == ("all",) else tuple(targets)
    unknown = [n for n in names if n not in LORA_MODULES]
    if unknown:
        raise ChipspanError(
            f"lora target '{unknown[0]}' is not a linear layer of a {config.model_type} decoder; "
            f"choose from {', '.join(LORA_MODULES)} or all"
        )
    return names


def _lora_parameters_per_layer(config: ModelConfig, rank: int, targets: tuple[str, ...]) -> int:
    """Adapter parameters of one layer: rank · (in + out) per adapted linear layer."""
    shapes = _linear_shapes(config)
    return sum(rank * sum(shapes[n]) for n in _lora_targets(config, targets))


def _freeze_parameters_per_layer(config: ModelConfig, modules: str) -> int:
    """Trained parameters of one trainable layer under "freeze" (mlp, self_attn, or all)."""
    h, inter = config.hidden_size, config.intermediate_size
    mlp = 3 * h * inter + (2 * inter + h if config.mlp_bias else 0)
    sizes = {"mlp": mlp, "self_attn": config.parameters_per_layer - mlp - 2 * h}
    return sum(sizes[n] for n in freeze_modules(modules))


def _too_small(config: ModelConfig, budget: int, chip: int, job: Job) -> str:
    """One line: which chip overflows, and the smallest usable memory that holds the job."""
    num_layers = config.num_hidden_layers
    need = max(estimate(config, range(i, i + 1), i == 0, i == num_layers - 1, job).total for i in range(num_layers))
    return (
        f"chip {chip} cannot fit one decoder layer in {budget / GIB:.2f} GiB usable: this job "
        f"needs at least {need / GIB:.2f} GiB usable per chip (one layer per chip over {num_layers} chips); "
        "use chips with more memory, LoRA, gradient checkpointing, or a smaller batch or cutoff_len"
    )
