"""`chipspan plan`: what a training job needs on each chip, from ``config.json`` alone; and the
chips and layer split `train` uses.

Takes `train`'s flags. With ``--chip_memory`` it also finds the fewest chips that hold the job
(``--chips auto``) and says whether the chips asked for are enough. Nothing is loaded but the
config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import torch

from chipspan import devices
from chipspan.args import RunArguments
from chipspan.chips.job import Job, job_of, one_process_per_chip
from chipspan.chips.memory import (
    GIB,
    VIRTUAL_STAGES,
    ChipMemory,
    Schedule,
    balanced_split,
    chip_totals,
    min_chips,
    split_estimates,
)
from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig
from chipspan.models.weights import parse_size
from chipspan.precision import choose_precision

# Devices whose chips finish each op before returning, so micro-batches in one process cannot
# overlap: the CPU's "chips" are one CPU, emulated chips compute on it.
SYNCHRONOUS_DEVICE_TYPES = (*devices.SINGLE_DEVICE_TYPES, "emu")
# torch >= 2.9's GPipe and interleaved 1F1B take fewer micro-batches per step than stages; 2.8's do not
TORCH_SCHEDULES_TAKE_FEW_MICRO_BATCHES = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 9)


@dataclass
class Plan:
    model: str
    chip_bytes: int | None  # usable memory per chip; None when not given
    min_chips: int | None  # fewest chips that hold the job; None without chip_bytes
    chips: list[ChipMemory]  # per pipeline stage (one per chip but under interleaved1f1b), first to last
    schedule: Schedule  # how the stages run the micro-batches
    micro_batches: int  # per batch
    processes: bool = False  # one process per chip (torchrun) rather than one process

    @property
    def num_chips(self) -> int:
        """Chips spanned (stages / stages per chip)."""
        return len(self.chips) // self.schedule.virtual

    @property
    def host_bytes(self) -> int:
        """Host memory the offloaded AdamW needs (0 without it)."""
        return sum(chip.host for chip in self.chips)

    @property
    def chip_totals(self) -> list[int]:
        """Each chip's predicted peak (the sum of its stages' under interleaved1f1b)."""
        return chip_totals(self.chips, self.schedule)

    @property
    def fits(self) -> bool | None:
        if self.chip_bytes is None:
            return None
        return all(total <= self.chip_bytes for total in self.chip_totals)


@dataclass(frozen=True)
class Span:
    """What `train` runs: its chips (or stages), their layers, and the micro-batches per batch."""

    layers: list[range]  # decoder layers per pipeline stage
    micro_batches: int
    schedule: Schedule
    job: Job  # what the memory model prices (``job_of``)


def schedule_of(run: RunArguments, micro_batches: int) -> Schedule:
    """One process runs GPipe over each batch's micro-batches (gradient accumulation steps one
    after another); one process per chip runs --pipeline_schedule over all of a step's."""
    if not one_process_per_chip(run):
        return Schedule("gpipe", micro_batches)
    return Schedule(run.chips.pipeline_schedule, micro_batches * run.training.gradient_accumulation_steps)


def choose_span(run: RunArguments, config: ModelConfig, num_chips: int, usable: int | None, device_type: str) -> Span:
    """The layers of ``num_chips`` chips and the micro-batches per batch.

    The one choice `plan` shows and `train` runs (in one process or one process per chip), priced
    in the precision the run computes in on ``device_type``. --micro_batches, when given, is kept.
    Otherwise the plan takes the most micro-batches that divide the batch and fit in ``usable``
    bytes per chip (the smaller the micro-batch, the smaller the pipeline's idle bubble and, under
    1F1B, the activations in flight) — the most, where the chip's memory is unknown (None) — or
    one micro-batch where the chips cannot overlap (a single chip; one process on the CPU or
    emulated chips). The layers balance the predicted memory. A split that does not fit is
    returned as it is: ``check_fits`` says so.
    """
    processes = one_process_per_chip(run)
    batch = run.training.per_device_train_batch_size
    if run.training.micro_batches is not None:
        candidates = [run.training.micro_batches]
    elif (not processes and (num_chips == 1 or device_type in SYNCHRONOUS_DEVICE_TYPES)) or (
        processes and run.training.optimizer_in_bwd  # one backward per step: one micro-batch
    ):
        candidates = [1]
    else:
        candidates = [m for m in range(batch, 0, -1) if batch % m == 0]
    candidates = [m for m in candidates if _whole_rounds(schedule_of(run, m), num_chips)]
    if not candidates:
        raise ChipspanError(
            f"interleaved1f1b runs micro-batches in rounds of {num_chips}: make the micro-batches "
            "per step (--micro_batches x gradient_accumulation_steps) a multiple of "
            f"{num_chips}"
        )
    candidates = [m for m in candidates if _enough_micro_batches(schedule_of(run, m), num_chips, processes)]
    if not candidates:
        raise ChipspanError(_too_few_micro_batches(run.chips.pipeline_schedule, num_chips))
    virtual = VIRTUAL_STAGES[run.chips.pipeline_schedule] if processes else 1
    precision = choose_precision(run, device_type)
    spans = []
    for micro in candidates:
        job, schedule = job_of(run, precision, micro), schedule_of(run, micro)
        spans.append(Span(balanced_split(config, job, num_chips * virtual, schedule), micro, schedule, job))
        if usable is None or max(_chip_peaks(config, spans[-1])) <= usable:
            return spans[-1]
    return spans[0]


def _whole_rounds(schedule: Schedule, num_chips: int) -> bool:
    """Whether torch's interleaved 1F1B takes this many micro-batches: whole rounds of the chips."""
    per_step = schedule.micro_batches
    return schedule.name != "interleaved1f1b" or per_step % max(1, per_step // num_chips) == 0


def _enough_micro_batches(schedule: Schedule, num_chips: int, processes: bool) -> bool:
    """Whether torch's schedules take this many micro-batches per step: 1F1B no fewer than its
    stages, and under torch 2.8 (one process per stage) every schedule."""
    asks = schedule.name == "1f1b" or (processes and not TORCH_SCHEDULES_TAKE_FEW_MICRO_BATCHES)
    return not asks or schedule.micro_batches >= num_chips


def _too_few_micro_batches(schedule: str, num_chips: int) -> str:
    if schedule == "1f1b":
        return (
            f"1f1b needs at least one micro-batch per stage, {num_chips} per step: raise --micro_batches "
            "(or gradient_accumulation_steps), or use --pipeline_schedule gpipe"
        )
    return (
        f"torch {torch.__version__}'s pipeline schedules need at least one micro-batch per stage, {num_chips} "
        "per step: raise --micro_batches (or gradient_accumulation_steps), or use torch 2.9 or newer"
    )


def make_plan(run: RunArguments) -> Plan:
    if not run.model.model_name_or_path:
        raise ChipspanError("--model_name_or_path is required: a model folder or its config.json")
    config = ModelConfig.from_folder(run.model.model_name_or_path)
    device_type = run.chips.device or devices.default_device_type()
    processes = one_process_per_chip(run)
    if processes:  # what torchrun would refuse, the plan of its job refuses too
        from chipspan.distributed.pipeline import check_schedule

        train = run.training
        check_schedule(run.chips.pipeline_schedule, train.micro_batches, train.per_device_train_batch_size)
    chip_bytes = None
    if run.chips.chip_memory is not None:
        chip_bytes = int(parse_size(run.chips.chip_memory) * run.chips.usable_fraction)
    fewest = None
    if chip_bytes is not None:
        chosen = choose_span(run, config, 1, chip_bytes, device_type)
        fewest = min_chips(config, chosen.job, chip_bytes, schedule=chosen.schedule)
    if run.chips.chips == "auto":
        if fewest is None:
            raise ChipspanError("--chips auto needs --chip_memory, the memory of one chip (e.g. 16GiB)")
        count = fewest
    else:
        count = len(devices.parse_chip_ids(run.chips.chips)) // (run.chips.data_parallel if processes else 1)
    virtual = VIRTUAL_STAGES[run.chips.pipeline_schedule] if processes else 1
    if count * virtual > config.num_hidden_layers:
        raise ChipspanError(
            f"{count * virtual} pipeline stages asked for but the model has only {config.num_hidden_layers} layers"
        )
    span = choose_span(run, config, count, chip_bytes, device_type)
    chips = split_estimates(config, span.layers, span.job, span.schedule)
    return Plan(run.model.model_name_or_path, chip_bytes, fewest, chips, span.schedule, span.micro_batches, processes)


def train_chips(run: RunArguments, config: ModelConfig, device_type: str) -> tuple[list[int], Span, int | None]:
    """Where `train` (one process) puts the model, before any weight loads: (chip ids, the span —
    each chip's decoder layers and the micro-batches per batch —, the bytes of one chip or None
    where unknown).

    A chip's memory is --chip_memory on emulated chips, else what the first chip reports (taken
    for all); the plan may use ``usable_fraction`` of it. Known, a split the plan says will
    overflow is refused, and ``--chips auto`` takes the fewest chips that hold the job. Unknown
    (the CPU), ``--chips auto`` is refused. The split is ``choose_span``'s, as `chipspan plan` shows.
    """
    auto = run.chips.chips == "auto"
    chip_ids = None if auto else devices.parse_chip_ids(run.chips.chips)
    if not auto:
        check_chip_count(len(chip_ids), config)
    chip_bytes = _chip_memory(run, device_type, chip_ids[0] if chip_ids else 0)
    if chip_bytes is None:
        if auto:
            raise ChipspanError(_auto_needs_memory(device_type))
        return chip_ids, choose_span(run, config, len(chip_ids), None, device_type), None
    usable = int(chip_bytes * run.chips.usable_fraction)
    if auto:
        single = choose_span(run, config, 1, usable, device_type)
        chip_ids = list(range(min_chips(config, single.job, usable, schedule=single.schedule)))
        _check_chips_exist(device_type, len(chip_ids), usable)
    span = choose_span(run, config, len(chip_ids), usable, device_type)
    check_fits(config, span, usable, device_type, chip_ids)
    return chip_ids, span, chip_bytes


def stage_span(run: RunArguments, config: ModelConfig, num_stages: int, device: torch.device) -> Span:
    """The layers of each pipeline stage and the micro-batches per batch for one process per chip
    (``num_stages`` = pipeline ranks × stages per rank), refused before any weight loads when the
    plan says the fullest chip overflows. The chip's memory is found as in one process
    (``_chip_memory``): --chip_memory on emulated chips, what this rank's device reports, or none
    (the CPU)."""
    pipeline_ranks = num_stages // VIRTUAL_STAGES[run.chips.pipeline_schedule]
    chip_bytes = _chip_memory(run, device.type, device.index or 0)
    usable = None if chip_bytes is None else int(chip_bytes * run.chips.usable_fraction)
    span = choose_span(run, config, pipeline_ranks, usable, device.type)
    if usable is not None:
        check_fits(config, span, usable, device.type, list(range(pipeline_ranks)))
    return span


def _auto_needs_memory(device_type: str) -> str:
    if device_type == "emu":
        return "--chips auto on emulated chips needs --chip_memory, the memory of one chip (e.g. 16GiB)"
    rehearse = ", or rehearse on emulated chips: --device emu --chip_memory 16GiB --chips auto"
    return (
        f"--chips auto needs the memory of one chip, and device '{device_type}' reports none: name the chips "
        f"(e.g. --chips 0-3){rehearse if device_type in devices.SINGLE_DEVICE_TYPES else ''}"
    )


def check_chip_count(count: int, config: ModelConfig) -> None:
    """Refuse more chips than decoder layers: every chip holds at least one."""
    if count > config.num_hidden_layers:
        raise ChipspanError(
            f"{count} chips asked for (SOPHGO_SPLIT / --chips) but the model has only "
            f"{config.num_hidden_layers} decoder layers; use at most {config.num_hidden_layers}"
        )


def emulated_chip_memory(run: RunArguments, device_type: str) -> int | None:
    """--chip_memory in bytes (None when not given); refused on chips that report their own."""
    if run.chips.chip_memory is None:
        return None
    if device_type != "emu":
        raise ChipspanError(
            f"--chip_memory sets the memory of emulated chips (--device emu); device '{device_type}' reports its own"
        )
    return parse_size(run.chips.chip_memory)


def _chip_memory(run: RunArguments, device_type: str, chip_id: int) -> int | None:
    """Total bytes of one chip: --chip_memory on emulated chips, what chip ``chip_id`` reports on
    an accelerator, None where nothing says (the CPU)."""
    if run.chips.chip_memory is not None:
        return emulated_chip_memory(run, device_type)
    if device_type == "emu" or device_type in devices.SINGLE_DEVICE_TYPES:
        return None
    devices.prepare_device_type(device_type)  # the plugin, before asking the chip
    return _reported_memory(devices.chip_devices(device_type, [chip_id])[0])


def _reported_memory(device: torch.device) -> int | None:
    """The total bytes ``device`` reports, None where it reports nothing."""
    module = torch.get_device_module(device.type)
    for read in (lambda: module.get_device_properties(device).total_memory, lambda: module.mem_get_info(device)[1]):
        try:
            return int(read())
        except (AttributeError, RuntimeError, TypeError):
            continue
    return None


def _check_chips_exist(device_type: str, needed: int, usable: int) -> None:
    if device_type == "emu":  # emulated chips are made on demand
        return
    available = devices.device_count(device_type)
    if needed > available:
        raise ChipspanError(
            f"--chips auto: this job needs {needed} chips of {size_text(usable)} usable, but this "
            f"machine shows {available} '{device_type}' device(s)"
        )


def check_fits(config: ModelConfig, span: Span, usable: int, device_type: str, chip_ids: list[int]) -> None:
    """ChipspanError naming the fullest chip when the plan says it overflows, and what would fit."""
    totals = _chip_peaks(config, span)
    worst = max(range(len(totals)), key=totals.__getitem__)
    if totals[worst] <= usable:
        return
    held = ", ".join(
        f"layers {r.start}-{r.stop - 1}" if len(r) > 1 else f"layer {r.start}"
        for r in span.layers[worst :: len(totals)]
    )
    name = device_type if device_type in devices.SINGLE_DEVICE_TYPES else f"{device_type}:{chip_ids[worst]}"
    raise ChipspanError(
        f"chip {chip_ids[worst]} ({name}) would run out of memory: the plan (docs/plan.md) predicts "
        f"a {size_text(totals[worst])} peak for {held} against {size_text(usable)} usable; "
        f"{_what_fits(config, span, len(totals), usable, chip_ids[0])}"
    )


def _what_fits(config: ModelConfig, span: Span, num_chips: int, usable: int, first_chip: int) -> str:
    """What would hold the job on chips of ``usable`` bytes: more chips, or recomputation."""
    hints, job = [], span.job
    try:
        fewest = min_chips(config, job, usable, schedule=span.schedule)
        hints.append(f"span {fewest} chips (--chips {first_chip}-{first_chip + fewest - 1})")
    except ChipspanError:
        pass  # not even one layer per chip fits
    if not job.gradient_checkpointing:
        recompute = replace(job, gradient_checkpointing=True)
        stages = balanced_split(config, recompute, len(span.layers), span.schedule)
        if max(_chip_peaks(config, Span(stages, span.micro_batches, span.schedule, recompute))) <= usable:
            hints.append("drop --disable_gradient_checkpointing")
    if not hints:
        lora = "" if job.finetuning_type == "lora" else "LoRA, "
        return (
            f"lower per_device_train_batch_size or cutoff_len, or use {lora}chips with more memory "
            "(`chipspan plan` shows each chip)"
        )
    return "it fits if you " + ", or ".join(hints)


def _chip_peaks(config: ModelConfig, span: Span) -> list[int]:
    """Each chip's predicted peak bytes."""
    return chip_totals(split_estimates(config, span.layers, span.job, span.schedule), span.schedule)


def size_text(num_bytes: int) -> str:
    """``num_bytes`` in GiB (2 decimals), or MiB below one GiB."""
    return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB else f"{num_bytes / (1 << 20):.1f} MiB"


def render(plan: Plan) -> str:
    """A table: one row per pipeline stage, GiB per kind of memory, and the verdict."""
    virtual = plan.schedule.virtual
    header = (
        f"{'chip':>4}  {'layers':>9}  {'m':>3}  {'weights':>8}  {'grads':>8}  {'optim':>8}  {'activ':>8}  "
        f"{'logits':>8}  {'work':>8}  {'peak':>8}  at"
    )
    rows = [_how_it_runs(plan), header]
    num_chips = plan.num_chips
    for stage, chip in enumerate(plan.chips):
        span = f"{chip.layers.start}-{chip.layers.stop - 1}"
        cells = [
            chip.weights,
            chip.gradients,
            chip.optimizer,
            chip.activations,
            chip.logits,
            chip.workspace,
            chip.total,
        ]
        rows.append(
            f"{stage % num_chips:>4}  {span:>9}  {chip.in_flight:>3}  "
            + "  ".join(f"{c / GIB:8.2f}" for c in cells)
            + f"  {chip.peak_at}"
        )
    rows.append(
        "(GiB; m: micro-batches in flight; peak: the predicted peak of a training step, at the moment "
        "named — the largest of its moments, not the sum of the columns; see docs/plan.md)"
    )
    host = plan.host_bytes
    if host:
        rows.append(
            f"host memory for the offloaded AdamW (fp32 master weights, moments, gradient copies): {size_text(host)}"
        )
    if virtual > 1:
        rows.append(
            "per chip, its stages together (a bound from above): "
            + ", ".join(f"{c}: {total / GIB:.2f}" for c, total in enumerate(plan.chip_totals))
        )
    if plan.chip_bytes is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        rows.append(
            f"{num_chips} chip(s) of {plan.chip_bytes / GIB:.2f} GiB usable: {verdict}; "
            f"the fewest chips that hold this job: {plan.min_chips}"
        )
    return "\n".join(rows)


def _how_it_runs(plan: Plan) -> str:
    schedule = plan.schedule
    if not plan.processes:
        return (
            f"one process, {len(plan.chips)} chip(s): each batch in {plan.micro_batches} micro-batch(es), GPipe order"
        )
    return (
        f"one process per chip, {schedule.name}: each batch in {plan.micro_batches} micro-batch(es), "
        f"{schedule.micro_batches} per optimizer step through the pipeline"
    )


def to_json(plan: Plan) -> str:
    num_chips = plan.num_chips
    chips = [
        {
            **{k: v for k, v in asdict(chip).items() if k != "layers"},
            "chip": stage % num_chips,
            "layers": [chip.layers.start, chip.layers.stop - 1],
            "total": chip.total,
        }
        for stage, chip in enumerate(plan.chips)
    ]
    return json.dumps(
        {
            "model": plan.model,
            "chip_bytes": plan.chip_bytes,
            "min_chips": plan.min_chips,
            "fits": plan.fits,
            "schedule": plan.schedule.name,
            "micro_batches": plan.micro_batches,
            "one_process_per_chip": plan.processes,
            "chip_totals": plan.chip_totals,
            "chips": chips,
        },
        indent=2,
    )
