"""The memory plan: per-chip estimates, the greedy packer, the balanced split, LLaMA-Factory 0.5's chip counts,
and the estimate against measured peaks (emu chips, and FakeTensorMode at Llama-2-7B's shape)."""

import dataclasses
import itertools
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import LF05_CHIP_FLAGS

from chipspan import emu
from chipspan.args import parse_run_arguments
from chipspan.chips import span
from chipspan.chips.job import Job, job_of
from chipspan.chips.memory import Schedule, balanced_split, estimate, min_chips, pack_layers, split_estimates
from chipspan.chips.placement import split_layers
from chipspan.chips.plan import choose_span, schedule_of
from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig
from chipspan.models.weights import parse_size
from chipspan.precision import choose_precision
from chipspan.train.recipe import _placement, run_train

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
LLAMA2_7B = ModelConfig.from_folder(CONFIGS / "llama2-7b.json")
IN_BACKWARD = ["--optimizer_in_bwd", "--max_grad_norm", "0"]  # each weight stepped inside backward
LLAMA2_13B = ModelConfig.from_folder(CONFIGS / "llama2-13b.json")
# LLaMA-Factory 0.5's LoRA job: --fp16 on a chip (a frozen fp16 base, fp16 autocast, fp32 adapters); its full job
# in fp32
LF05_LORA = Job("lora", seq_len=1024, batch=1, base_bytes=2, compute_bytes=2, autocast=True)
LF05_FULL = dataclasses.replace(LF05_LORA, finetuning_type="full", base_bytes=4, compute_bytes=4, autocast=False)


def _toy(layers=6, tied=False):
    return ModelConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 160,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "tie_word_embeddings": tied,
        }
    )


def _totals(config, slices, job):
    last = config.num_hidden_layers
    return [estimate(config, r, r.start == 0, r.stop == last, job).total for r in slices]


def test_published_parameter_counts():
    assert LLAMA2_7B.num_parameters == 6_738_415_616
    assert LLAMA2_13B.num_parameters == 13_015_864_320


@pytest.mark.parametrize(
    "config, job, gb_chips, gib_chips",
    [
        (LLAMA2_7B, LF05_LORA, 2, 2),
        (LLAMA2_13B, LF05_LORA, 3, 3),
        (LLAMA2_7B, LF05_FULL, 12, 11),
        (LLAMA2_13B, LF05_FULL, 21, 21),
    ],
)
def test_lf05_chip_counts_at_14_gb_usable(config, job, gb_chips, gib_chips):
    # LLaMA-Factory 0.5 ran 2 / 4 / 11 / 21. 13B LoRA needs 3: chipspan's layers save ~0.45x what the
    # Korthikanti count assumed. 7B full needs 12 at 14·10^9 bytes but 11 at 14 GiB: AdamW's
    # foreach step takes 4 more bytes per parameter (docs/plan.md).
    assert min_chips(config, job, 14 * 10**9) == gb_chips
    assert min_chips(config, job, 16 * 10**9, usable_fraction=0.875) == gb_chips
    assert min_chips(config, job, 14 * 2**30) == gib_chips


def test_greedy_packing_fills_chips_in_order():
    slices = pack_layers(LLAMA2_13B, LF05_FULL, 14 * 10**9)
    assert [len(r) for r in slices] == [1] + [2] * 19 + [1]
    assert [r.start for r in slices[1:]] == [r.stop for r in slices[:-1]]
    assert max(_totals(LLAMA2_13B, slices, LF05_FULL)) <= 14 * 10**9


def test_bytes_per_parameter():
    whole = dict(layers=range(LLAMA2_7B.num_hidden_layers), first=True, last=True)
    lora = estimate(LLAMA2_7B, **whole, job=LF05_LORA)
    assert 2.0 < lora.weights / LLAMA2_7B.num_parameters < 2.02  # fp16 base + fp32 adapters and their copies
    assert lora.gradients == lora.optimizer / 2 > 0
    full = estimate(LLAMA2_7B, **whole, job=LF05_FULL)
    assert full.weights + full.gradients + full.optimizer == 16 * LLAMA2_7B.num_parameters
    # split over chips the full job still holds 16 bytes per parameter, no more (untied head)
    slices = pack_layers(LLAMA2_7B, LF05_FULL, 14 * 10**9)
    states = [estimate(LLAMA2_7B, r, r.start == 0, r.stop == 32, LF05_FULL) for r in slices]
    assert sum(s.weights + s.gradients + s.optimizer for s in states) == 16 * LLAMA2_7B.num_parameters
    # fp32 weights under 16-bit autocast: the 16-bit copies autocast saves for backward are
    # activations (one set per micro-batch in flight), not weights
    mixed = estimate(LLAMA2_7B, **whole, job=dataclasses.replace(LF05_FULL, compute_bytes=2, autocast=True))
    assert mixed.weights + mixed.gradients + mixed.optimizer == 16 * LLAMA2_7B.num_parameters
    assert mixed.activations > 2 * 32 * LLAMA2_7B.parameters_per_layer * 0.99


def test_activations_count_what_each_layer_saves():
    s, h, i, a, d = 1024, 4096, 11008, 32, 128
    one = estimate(LLAMA2_7B, range(1, 2), False, False, LF05_LORA)
    # fp16 base, LoRA r8 on q and v (docs/plan.md): two norms' fp32 inputs and inverse RMS, q/k/v/out
    # and the log-sum-exp, SwiGLU's gate/SiLU/up, each adapter's 16-bit input copy, middle and
    # A/B copies; the rope tables once per chip
    layer = (
        2 * (4 * s * h + 4 * s)
        + 2 * s * 4 * h
        + 4 * s * a
        + 3 * 2 * s * i
        + 2 * (2 * s * h + 2 * s * 8 + 2 * 8 * 2 * h)
    )
    assert one.activations == layer + 2 * 2 * s * d and one.logits == 0
    assert 0.4 < layer / (s * h * (34 + 5 * a * s / h)) < 0.5  # vs Korthikanti's eager-attention count
    four = estimate(LLAMA2_7B, range(1, 5), False, False, dataclasses.replace(LF05_LORA, micro_batches_in_flight=3))
    assert four.activations == 3 * (4 * layer + 2 * 2 * s * d)
    adapter_copies = 2 * (2 * 8 * 2 * h)  # the 16-bit A and B, once per step whatever the batch
    assert (
        estimate(LLAMA2_7B, range(1, 2), False, False, dataclasses.replace(LF05_LORA, batch=2)).activations
        == 2 * one.activations - adapter_copies
    )
    recomputed = estimate(
        LLAMA2_7B, range(1, 5), False, False, dataclasses.replace(LF05_LORA, gradient_checkpointing=True)
    )
    assert recomputed.activations == 4 * s * h * 2 + 2 * 2 * s * d  # each layer's input; the rope tables
    assert recomputed.total < estimate(LLAMA2_7B, range(1, 5), False, False, LF05_LORA).total
    # full fine-tuning in fp32 peaks in AdamW's step: 16 bytes per parameter plus 4 of temporaries
    full = estimate(LLAMA2_7B, range(1, 4), False, False, LF05_FULL)
    assert full.peak_at == "optimizer step" and full.total == 20 * 3 * LLAMA2_7B.parameters_per_layer - 4 * 3 * 2 * h


def test_only_the_last_chip_pays_for_the_loss_and_tied_head_is_copied_there():
    job = dataclasses.replace(LF05_LORA, seq_len=32)
    assert estimate(_toy(), range(0, 3), True, False, job).logits == 0
    assert estimate(_toy(), range(3, 6), False, True, job).logits > 0
    tied = _toy(tied=True)
    embed = tied.vocab_size * tied.hidden_size
    alone = estimate(tied, range(0, 6), True, True, job).weights
    split = [estimate(tied, r, r.start == 0, r.stop == 6, job).weights for r in (range(0, 3), range(3, 6))]
    assert sum(split) - alone == 2 * embed  # one more fp16 copy of the embeddings, on the last chip


def test_freeze_trains_and_keeps_activations_only_from_the_first_trainable_layer():
    config = _toy(layers=6)
    job = dataclasses.replace(LF05_LORA, finetuning_type="freeze", seq_len=32, num_layer_trainable=2)
    early, late = (estimate(config, r, r.start == 0, r.stop == 6, job) for r in (range(0, 4), range(4, 6)))
    assert early.gradients == early.activations == 0
    assert late.gradients == 2 * 3 * 64 * 160 * 4  # two layers' fp32 MLP gradients
    first = estimate(config, range(0, 4), True, False, dataclasses.replace(job, num_layer_trainable=-1))
    assert first.gradients > 0 and first.activations > 0


@pytest.mark.parametrize("job", [LF05_LORA, LF05_FULL, dataclasses.replace(LF05_LORA, gradient_checkpointing=True)])
@pytest.mark.parametrize("config", [LLAMA2_7B, LLAMA2_13B])
def test_balanced_split_is_never_fuller_than_even_or_greedy(config, job):
    greedy = pack_layers(config, job, 14 * 10**9)
    balanced = balanced_split(config, job, len(greedy))
    assert [len(r) for r in balanced] and sum(len(r) for r in balanced) == config.num_hidden_layers
    assert max(_totals(config, balanced, job)) <= max(_totals(config, greedy, job))
    for chips in (1, 2, 3, 8):
        even = split_layers(config.num_hidden_layers, chips)
        assert max(_totals(config, balanced_split(config, job, chips), job)) <= max(_totals(config, even, job))


def test_balanced_split_is_optimal_on_a_small_model():
    config, job = _toy(layers=7), dataclasses.replace(LF05_FULL, seq_len=64)
    for chips in range(1, 8):
        best = min(
            max(_totals(config, [range(a, b) for a, b in zip((0,) + cuts, cuts + (7,))], job))
            for cuts in itertools.combinations(range(1, 7), chips - 1)
        )
        assert max(_totals(config, balanced_split(config, job, chips), job)) == best


@pytest.mark.parametrize("schedule", [None, Schedule("1f1b", 8)])
def test_the_balanced_split_prices_a_number_of_slices_linear_in_the_layers(monkeypatch, schedule):
    from chipspan.chips import memory

    priced = []
    monkeypatch.setattr(memory, "estimate", lambda *args, **kwargs: priced.append(1) or estimate(*args, **kwargs))
    counts = []
    for layers in (128, 256, 512):
        priced.clear()
        split = balanced_split(_toy(layers), dataclasses.replace(LF05_LORA, seq_len=64), layers // 3, schedule)
        assert len(split) == layers // 3 and split[-1].stop == layers
        counts.append(len(priced))
    # a search over every (start, stop) pair per chip grows 8-fold per doubling, a quadratic one 4-fold;
    # this one (chips x log layers, times the bits of the bound) a little over 2-fold
    assert counts[1] < 3 * counts[0] and counts[2] < 3 * counts[1], counts


def test_min_chips_under_1f1b_is_the_first_count_whose_balanced_split_fits():
    from chipspan.chips.memory import chip_totals

    config, schedule = _toy(24), Schedule("1f1b", 6)
    job = dataclasses.replace(LF05_LORA, seq_len=256, batch=2)

    def fits(chips, budget):
        split = balanced_split(config, job, chips, schedule)
        return max(chip_totals(split_estimates(config, split, job, schedule), schedule)) <= budget

    found = []
    for mib in (8, 10, 12, 15, 20):  # the packer says 5, 4, 3, 3, 2: 1F1B's first stages hold more
        scanned = next(chips for chips in range(1, 25) if fits(chips, mib * 2**20))
        found.append(min_chips(config, job, mib * 2**20, schedule=schedule))
        assert found[-1] == scanned, mib
    assert found == [18, 15, 12, 5, 3]
    with pytest.raises(ChipspanError, match="^no split of the 24 layers over up to 24 chips .* keep up to 6 micro"):
        min_chips(config, job, 6 * 2**20, schedule=schedule)


def test_a_chip_smaller_than_one_layer_says_what_would_fit():
    with pytest.raises(ChipspanError, match=r"needs at least \d+\.\d\d GiB usable per chip") as error:
        pack_layers(LLAMA2_13B, LF05_FULL, 4 * 2**30)
    need = float(re.search(r"at least (\S+) GiB", str(error.value)).group(1))
    assert min_chips(LLAMA2_13B, LF05_FULL, int((need + 0.01) * 2**30)) == 40
    with pytest.raises(ChipspanError, match="cannot fit one decoder layer"):
        pack_layers(LLAMA2_13B, LF05_FULL, int((need - 0.01) * 2**30))
    with pytest.raises(ChipspanError, match="1 to 32 chips"):
        balanced_split(LLAMA2_7B, LF05_LORA, 33)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(base_bytes=1), "bytes per element must be 2"),
        (dict(seq_len=0), "at least 1"),
        (dict(lora_targets=("qkv",)), "lora target 'qkv'"),
        (dict(finetuning_type="freeze", num_layer_trainable=0), "num_layer_trainable"),
        (dict(finetuning_type="freeze", name_module_trainable="attn"), "name_module_trainable"),
    ],
)
def test_bad_knobs_are_user_errors(change, message):
    with pytest.raises(ChipspanError, match=message):
        estimate(_toy(), range(0, 2), True, False, dataclasses.replace(LF05_LORA, **change))


# --- `chipspan plan` on LLaMA-Factory 0.5's command lines -------------------------------------------------

LF05_FLAGS = [
    *LF05_CHIP_FLAGS,
    "--disable_gradient_checkpointing",
    "--chip_memory",
    "14GB",
    "--chips",
    "auto",
    "--json",
]


@pytest.mark.parametrize(
    "size,finetuning,chips",
    [
        ("7b", "lora", 2),
        ("13b", "lora", 3),
        # 14GB = 14·10^9 bytes: 7B full needs 12 (11 at 14GiB), see test_lf05_chip_counts_at_14_gb_usable
        ("7b", "full", 12),
        ("13b", "full", 21),
    ],
)
def test_plan_command_on_the_lf05_jobs(size, finetuning, chips, capsys):
    _plan_lf05_job(size, finetuning, [], chips, capsys)


@pytest.mark.parametrize(
    "size, finetuning, savers, chips",
    [
        ("7b", "lora", [], 1),
        ("13b", "lora", ["--quantization_bit", "4"], 1),
        ("7b", "full", ["--pure_bf16", "--optim", "adamw_8bit"], 3),
        ("13b", "full", ["--pure_bf16", "--offload_optimizer"], 4),
        ("7b", "full", ["--pure_bf16", "--optim", "adamw_8bit", *IN_BACKWARD], 2),
        ("13b", "full", ["--pure_bf16", "--optim", "adamw_8bit", *IN_BACKWARD], 4),  # no host memory
    ],
)
def test_the_savers_bring_the_lf05_jobs_to_fewer_chips(size, finetuning, savers, chips, capsys):
    """LLaMA-Factory 0.5's 2 / 4 / 11 / 21 chips of 14 GiB with recomputation (the default) and a
    saver each: 1 / 1 / 3 / 4 (2 and 4 with each weight stepped inside backward); the offloaded job
    says how much host memory it takes."""
    plan = _plan_lf05_job(size, finetuning, savers, chips, capsys, recompute=True, chip_memory="14GiB")
    host = sum(chip["host"] for chip in plan["chips"])
    assert (host > 0) == ("--offload_optimizer" in savers)
    if host:  # 16 bytes per trained parameter of 13.0 billion: fp32 master, two moments, the gradient's copy
        assert host == 16 * sum(chip["weights"] // 2 for chip in plan["chips"])


def _plan_lf05_job(size, finetuning, savers, chips, capsys, recompute=False, chip_memory="14GB"):
    """`chipspan plan --json` of LLaMA-Factory 0.5's job of ``size`` with ``savers``: it fits on ``chips``
    chips, the fewest, each predicted within the chip's memory."""
    from chipspan.cli import main

    target = ["--lora_target", "q_proj,v_proj"] if finetuning == "lora" else []
    dropped = {"--disable_gradient_checkpointing"} if recompute else set()
    dropped |= {"--fp16"} if "--pure_bf16" in savers else set()  # --pure_bf16 takes its place
    argv = [
        "plan",
        "--model_name_or_path",
        str(CONFIGS / f"llama2-{size}.json"),
        "--finetuning_type",
        finetuning,
        *target,
        *[flag for flag in LF05_FLAGS[:-5] if flag not in dropped],
        *LF05_FLAGS[-3:],
        *savers,
        "--chip_memory",
        chip_memory,
    ]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["min_chips"] == len(plan["chips"]) == chips and plan["fits"]
    assert all(chip["total"] <= parse_size(chip_memory) for chip in plan["chips"])
    return plan


# --- the estimate against measured peaks (bench/memory_check.py) --------------------------------


def _measure(config, split, job, mode):
    import memory_check

    results = memory_check.measure(config, split, job, mode, steps=2)
    return [(r.predicted, r.measured) for r in results]


@pytest.mark.parametrize(
    "job",
    [
        dict(finetuning_type="lora", half=True),
        dict(finetuning_type="full", half=False),
        dict(finetuning_type="lora", half=True, quantization_bit=4),
        dict(finetuning_type="full", optim="adamw_8bit", gradient_checkpointing=True),
        dict(finetuning_type="full", pure_bf16=True, gradient_checkpointing=True),  # stochastic rounding
        dict(finetuning_type="full", pure_bf16=True, gradient_checkpointing=True, optimizer_in_bwd=True),
    ],
)
def test_estimate_matches_fake_tensor_peaks_at_7b_shape(job):
    # one Llama-2-7B layer per chip (embeddings / middle / head), s = 1024, run under FakeTensorMode
    import memory_check

    from chipspan import emu

    if not emu.is_available():
        pytest.skip("the emu device cannot be built here (no C++ compiler?)")
    config = dataclasses.replace(LLAMA2_7B, num_hidden_layers=3)
    for predicted, measured in _measure(config, [1, 1, 1], memory_check.Job(**job), "fake"):
        assert 0.9 < predicted / measured < 1.1


@pytest.mark.parametrize(
    "job",
    [
        dict(finetuning_type="lora", half=True),
        dict(finetuning_type="full", half=False),
        dict(finetuning_type="full", pure_bf16=True),  # bf16 weights, gradients and AdamW moments, no autocast
        dict(finetuning_type="lora", pure_bf16=True),
        dict(finetuning_type="lora", quantization_bit=4),
        dict(finetuning_type="lora", quantization_bit=8),
        dict(finetuning_type="full", optim="adamw_8bit"),
        dict(finetuning_type="full", pure_bf16=True, optim="adamw_8bit"),
        dict(finetuning_type="full", offload_optimizer=True),
        dict(finetuning_type="full", pure_bf16=True, offload_optimizer=True),
        dict(finetuning_type="full", optimizer_in_bwd=True),
        dict(finetuning_type="full", pure_bf16=True, optim="adamw_8bit", optimizer_in_bwd=True),
        dict(finetuning_type="lora", optimizer_in_bwd=True),
    ],
)
def test_estimate_matches_emu_peaks(job):
    # a small random Llama really trained on two emulated chips; emu's own per-chip peak
    import memory_check

    from chipspan import emu

    if not emu.is_available():
        pytest.skip("the emu device cannot be built here (no C++ compiler?)")
    config = memory_check.small_config(layers=2, hidden=128, vocab=4096)
    for predicted, measured in _measure(config, [1, 1], memory_check.Job(**job, seq_len=128), "emu"):
        assert 0.9 < predicted / measured < 1.1


@pytest.mark.parametrize("in_backward", [False, True])
def test_estimate_matches_emu_peaks_with_a_tied_embedding_over_two_chips(in_backward):
    """The embedding on the first chip, its copy as the head on the last: their gradients summed
    after backward, on the first chip without a third copy."""
    import memory_check

    from chipspan import emu

    if not emu.is_available():
        pytest.skip("the emu device cannot be built here (no C++ compiler?)")
    config = dataclasses.replace(memory_check.small_config(layers=2, hidden=128, vocab=4096), tie_word_embeddings=True)
    job = memory_check.Job(finetuning_type="full", seq_len=128, optimizer_in_bwd=in_backward)
    for predicted, measured in _measure(config, [1, 1], job, "emu"):
        assert 0.9 < predicted / measured < 1.1


def test_the_plan_prices_the_precision_the_run_computes_in(tmp_path):
    folder = _model_folder(tmp_path, **HEAVY_LAYERS)
    config = ModelConfig.from_folder(folder)
    pure = _train_run(folder, "--finetuning_type", "full", "--pure_bf16")
    on_chip = _job_of(pure, "emu")
    assert (on_chip.base_bytes, on_chip.compute_bytes, on_chip.autocast) == (2, 2, False)
    assert (on_chip.trained_bytes, on_chip.gradient_bytes, on_chip.moment_bytes) == (2, 2, 2)
    whole = estimate(config, range(8), True, True, on_chip)
    assert whole.weights + whole.gradients + whole.optimizer == 8 * config.num_parameters  # 2 + 2 + 2 x 2 bytes
    # the CPU ignores the 16-bit flags and computes in fp32: so does its plan
    fp32 = _job_of(_train_run(folder, "--finetuning_type", "full"), "cpu")
    assert _job_of(pure, "cpu") == fp32 == _job_of(_train_run(folder, "--finetuning_type", "full", "--fp16"), "cpu")
    assert (fp32.base_bytes, fp32.trained_bytes, fp32.moment_bytes) == (4, 4, 4)
    # --fp16 on a chip: fp32 trained weights under fp16 autocast
    mixed = _job_of(_train_run(folder, "--finetuning_type", "full", "--fp16"), "emu")
    assert (mixed.base_bytes, mixed.compute_bytes, mixed.autocast, mixed.trained_bytes) == (4, 2, True, 4)


# --- `train`'s placement from the plan: --chips auto, the balanced split, refusals ----------------


def _model_folder(tmp_path, **shape):
    """A folder holding only config.json: enough for everything `train` does before loading weights."""
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        **shape,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


HEAVY_HEAD = dict(vocab_size=32000, hidden_size=64, intermediate_size=160)  # full: the head's chip is the fullest
HEAVY_LAYERS = dict(vocab_size=512, hidden_size=256, intermediate_size=688)


def _train_run(folder, *flags):
    return parse_run_arguments(
        [
            "--do_train",
            "--model_name_or_path",
            str(folder),
            "--dataset",
            "any",
            "--output_dir",
            str(folder.parent / f"{folder.name}-out"),
            "--cutoff_len",
            "256",
            "--per_device_train_batch_size",
            "2",
            *flags,
        ],
        {},
    )


def _job_of(run, device_type="cpu"):
    """The job `plan` prices and `train` places for ``run`` on ``device_type``."""
    return job_of(run, choose_precision(run, device_type))


@pytest.fixture()
def no_weight_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(span, "load_pretrained", refuse)


def test_micro_batches_set_the_plans_batch_and_schedule(tmp_path):
    folder = _model_folder(tmp_path, **HEAVY_HEAD)
    assert _job_of(_train_run(folder)).batch == 2
    job = _job_of(_train_run(folder, "--per_device_train_batch_size", "5", "--micro_batches", "2"))
    assert job.batch == 3  # 3 + 2 examples: the larger counts
    with pytest.raises(ChipspanError, match=r"--micro_batches 6 must be between 1 and per_device_train_batch_size"):
        _job_of(_train_run(folder, "--per_device_train_batch_size", "5", "--micro_batches", "6"))
    # one process: GPipe over each batch; one process per chip: the schedule over the whole step
    accumulate = ("--gradient_accumulation_steps", "3")
    assert schedule_of(_train_run(folder, *accumulate), 2) == Schedule("gpipe", 2)
    torchrun = _train_run(folder, *accumulate, "--launcher", "torchrun", "--pipeline_schedule", "1f1b")
    assert schedule_of(torchrun, 2) == Schedule("1f1b", 6)


def test_micro_batches_in_flight_per_schedule():
    assert [Schedule("gpipe", 8).in_flight(s, 4) for s in range(4)] == [8] * 4
    assert [Schedule("1f1b", 8).in_flight(s, 4) for s in range(4)] == [4, 3, 2, 1]
    assert [Schedule("1f1b", 2).in_flight(s, 4) for s in range(4)] == [2, 2, 2, 1]
    # interleaved, 2 chips x 2 stages, 4 micro-batches: chip 0 runs 4 warm-up forwards and one more
    # (stages 0, 0, 2, 2, 0) before its first backward, chip 1 runs 2 + 1 (stages 1, 1, 3)
    assert [Schedule("interleaved1f1b", 4).in_flight(s, 4) for s in range(4)] == [3, 2, 2, 1]


def test_interleaved_in_flight_follows_torchs_warm_up():
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    if not hasattr(schedules, "_get_warmup_ops"):
        pytest.skip(f"torch {torch.__version__} has no _get_warmup_ops to hold the plan to (torch >= 2.9 has)")
    _get_warmup_ops = schedules._get_warmup_ops

    for chips, micro in itertools.product((2, 3, 4), (2, 4, 6, 8, 12)):
        per_round = micro // max(1, micro // chips)
        if micro % max(1, micro // chips):
            continue
        schedule = Schedule("interleaved1f1b", micro)
        for chip in range(chips):
            warm_up = _get_warmup_ops(chip, 2, per_round, chips, micro)
            held = schedule.in_flight(chip, 2 * chips) + schedule.in_flight(chip + chips, 2 * chips)
            assert held == min(warm_up + 1, 2 * micro), (chips, micro, chip)


def test_1f1b_gives_the_first_stages_fewer_layers_and_may_need_more_chips():
    job, schedule = dataclasses.replace(LF05_LORA, batch=1), Schedule("1f1b", 8)
    split = balanced_split(LLAMA2_7B, job, 4, schedule)
    assert [len(r) for r in split] == sorted(len(r) for r in split)  # stage 0 keeps 4 micro-batches, 3 keeps 1
    assert [c.in_flight for c in split_estimates(LLAMA2_7B, split, job, schedule)] == [4, 3, 2, 1]
    one_at_a_time = min_chips(LLAMA2_7B, job, 14 * 10**9)
    assert min_chips(LLAMA2_7B, job, 14 * 10**9, schedule=schedule) >= one_at_a_time
    assert min_chips(LLAMA2_7B, job, 14 * 10**9, schedule=Schedule("gpipe", 8)) >= min_chips(
        LLAMA2_7B, job, 14 * 10**9, schedule=schedule
    )


def test_the_plan_chooses_the_micro_batches(tmp_path):
    folder = _model_folder(tmp_path, **HEAVY_LAYERS)
    config = ModelConfig.from_folder(folder)
    run = _train_run(folder, "--per_device_train_batch_size", "6")
    # one process: micro-batches overlap only where the chips run asynchronously
    assert choose_span(run, config, 2, None, "cpu").micro_batches == 1
    assert choose_span(run, config, 2, None, "emu").micro_batches == 1
    assert choose_span(run, config, 1, None, "cuda").micro_batches == 1
    assert choose_span(run, config, 2, None, "cuda").micro_batches == 6  # one example each: the least bubble
    given = _train_run(folder, "--per_device_train_batch_size", "6", "--micro_batches", "3")
    assert choose_span(given, config, 2, None, "cuda").micro_batches == 3
    # one process per chip: stage processes overlap on any device
    torchrun = _train_run(folder, "--per_device_train_batch_size", "6", "--launcher", "torchrun")
    span_ = choose_span(torchrun, config, 2, None, "cpu")
    assert (span_.micro_batches, span_.schedule) == (6, Schedule("1f1b", 6))
    interleaved = _train_run(
        folder,
        "--per_device_train_batch_size",
        "3",
        "--launcher",
        "torchrun",
        "--pipeline_schedule",
        "interleaved1f1b",
        "--gradient_accumulation_steps",
        "3",
    )
    assert choose_span(interleaved, config, 2, None, "cpu").micro_batches == 1  # 9 per step is not whole rounds of 2
    with pytest.raises(ChipspanError, match="interleaved1f1b runs micro-batches in rounds of 2: make"):
        choose_span(replace_training(interleaved, micro_batches=3), config, 2, None, "cpu")
    # torch's 1F1B takes no fewer micro-batches per step than stages: refused before loading, not at the first step
    one = replace_training(torchrun, micro_batches=1)
    with pytest.raises(ChipspanError, match="1f1b needs at least one micro-batch per stage, 2 per step"):
        choose_span(one, config, 2, None, "cpu")
    assert choose_span(replace_training(one, gradient_accumulation_steps=2), config, 2, None, "cpu").micro_batches == 1


def test_under_torch_2_8_every_schedule_needs_a_micro_batch_per_stage(tmp_path, monkeypatch):
    """torch 2.8's GPipe refuses fewer micro-batches per step than stages (2.9's takes them): the
    plan says so before anything loads; one process runs its own schedule and is not held to it."""
    from chipspan.chips import plan

    folder = _model_folder(tmp_path, **HEAVY_LAYERS)
    config = ModelConfig.from_folder(folder)
    gpipe = _train_run(folder, "--launcher", "torchrun", "--pipeline_schedule", "gpipe", "--micro_batches", "1")
    assert choose_span(gpipe, config, 2, None, "cpu").micro_batches == 1
    monkeypatch.setattr(plan, "TORCH_SCHEDULES_TAKE_FEW_MICRO_BATCHES", False)
    with pytest.raises(ChipspanError, match=r"pipeline schedules need at least one micro-batch per stage, 2 per step"):
        choose_span(gpipe, config, 2, None, "cpu")
    one_process = _train_run(folder, "--micro_batches", "1")
    assert choose_span(one_process, config, 2, None, "cpu").micro_batches == 1


def replace_training(run, **changes):
    return dataclasses.replace(run, training=dataclasses.replace(run.training, **changes))


def test_plan_shows_each_stages_micro_batches_in_flight(tmp_path, capsys):
    from chipspan.cli import main

    argv = [
        "plan",
        "--model_name_or_path",
        str(CONFIGS / "llama2-7b.json"),
        "--finetuning_type",
        "lora",
        "--per_device_train_batch_size",
        "8",
        "--fp16",
        "--cutoff_len",
        "1024",
        "--chips",
        "0-3",
        "--chip_memory",
        "16GiB",
        "--launcher",
        "torchrun",
        "--pipeline_schedule",
        "1f1b",
    ]
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["schedule"], plan["micro_batches"], plan["one_process_per_chip"]) == ("1f1b", 8, True)
    assert [chip["in_flight"] for chip in plan["chips"]] == [4, 3, 2, 1]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "one process per chip, 1f1b: each batch in 8 micro-batch(es), 8 per optimizer step" in table
    assert main([*argv[:-1], "interleaved1f1b", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [chip["chip"] for chip in plan["chips"]] == [0, 1, 2, 3] * 2 and len(plan["chip_totals"]) == 4


def test_chips_auto_on_emulated_chips_takes_the_fewest_and_balances_them(tmp_path):
    if not emu.is_available():
        pytest.skip("the emu device cannot be built here (no C++ compiler?)")
    folder = _model_folder(tmp_path, **HEAVY_HEAD)
    config = ModelConfig.from_folder(folder)
    job = _job_of(_train_run(folder, "--finetuning_type", "full"), "emu")
    balanced = balanced_split(config, job, 2)
    assert [len(r) for r in balanced] == [7, 1] and split_layers(8, 2) != tuple(balanced)  # the head is heavy
    fits_two = max(_totals(config, balanced, job))
    assert estimate(config, range(8), True, True, job).total > fits_two  # one chip is not enough
    try:
        for chips in ("auto", "0-1"):
            placement, _ = _placement(
                _train_run(
                    folder,
                    "--finetuning_type",
                    "full",
                    "--device",
                    "emu",
                    "--chips",
                    chips,
                    "--chip_memory",
                    str(fits_two),
                ),
                config,
            )
            assert placement.devices == (torch.device("emu", 0), torch.device("emu", 1))
            assert list(placement.layers) == balanced
    finally:
        emu.set_memory_limit(None)


def test_a_placement_that_will_not_fit_is_refused_before_loading(tmp_path, no_weight_loading):
    folder = _model_folder(tmp_path, **HEAVY_LAYERS)
    run = _train_run(
        folder,
        "--finetuning_type",
        "lora",
        "--lora_target",
        "all",
        "--disable_gradient_checkpointing",
        "--device",
        "emu",
        "--chips",
        "0-1",
        "--chip_memory",
        "50MB",
    )
    with pytest.raises(ChipspanError) as error:
        run_train(run)
    message = str(error.value)
    assert "\n" not in message and re.fullmatch(
        r"chip 1 \(emu:1\) would run out of memory: the plan \(docs/plan.md\) predicts a 56\.\d MiB peak for "
        r"layers 4-7 against 47\.7 MiB usable; it fits if you span 3 chips \(--chips 0-2\), or drop "
        r"--disable_gradient_checkpointing",
        message,
    ), message
    assert not Path(run.training.output_dir).exists()


def test_chips_auto_needs_a_chips_memory(tmp_path, no_weight_loading):
    folder = _model_folder(tmp_path, **HEAVY_HEAD)
    with pytest.raises(
        ChipspanError, match="--chips auto needs the memory of one chip, and device 'cpu' reports none: name the chips"
    ):
        run_train(_train_run(folder, "--finetuning_type", "full", "--device", "cpu", "--chips", "auto"))
    with pytest.raises(ChipspanError, match="--chips auto on emulated chips needs --chip_memory"):
        run_train(_train_run(folder, "--finetuning_type", "full", "--device", "emu", "--chips", "auto"))


@pytest.mark.multiprocess
def test_estimate_matches_each_stage_process_peak(tmp_path):
    # two stage processes (torchrun, gloo) train a small random Llama; each tracks its own peak.
    # Under 1F1B the first stage holds 2 of the 4 micro-batches at once and the last 1, with the
    # gradients of earlier micro-batches alive; under GPipe both hold all 4
    import stage_memory

    jobs = [
        dict(finetuning="full", schedule="1f1b", micro_batches=4, seq=128),
        dict(finetuning="lora", schedule="gpipe", micro_batches=4, seq=128),
    ]
    results = stage_memory.measure_stages(jobs, tmp_path)
    assert [[s["in_flight"] for s in stages] for stages in results] == [[2, 1], [4, 4]]
    for job, stages in zip(jobs, results):
        for stage in stages:
            assert 0.9 < stage["predicted"] / stage["measured"] < 1.1, (job, stage)


# --- `plan` and `train` choose alike: the split, the micro-batches, the path -----------------------


def _grid():
    """finetuning type x chips x --micro_batches x (one process | torchrun with each schedule) x device."""
    paths = [(None, "1f1b"), ("torchrun", "gpipe"), ("torchrun", "1f1b"), ("torchrun", "interleaved1f1b")]
    for finetuning, chips, micro, (launcher, schedule), device in itertools.product(
        ("lora", "full", "freeze"), (2, 4), (None, 2), paths, ("cpu", "emu")
    ):
        if launcher and schedule == "1f1b" and micro and micro < chips:
            continue  # fewer micro-batches than stages, which torch's 1F1B refuses (and so does the plan)
        flags = ["--finetuning_type", finetuning, "--chips", f"0-{chips - 1}", "--device", device]
        flags += ["--per_device_train_batch_size", "4", "--lora_target", "all"]
        flags += ["--micro_batches", str(micro)] if micro else []
        flags += ["--launcher", launcher, "--pipeline_schedule", schedule] if launcher else []
        flags += ["--chip_memory", "300MiB"] if device == "emu" else []  # a known memory: the plan checks the fit
        yield pytest.param(flags, id="-".join(f for f in flags[1::2] if f != "all"))


def _what_train_runs(run, config):
    """(layers per stage, micro-batches per batch, one process per chip) as `train` chooses them,
    through the functions train calls (one process: recipe._placement; a torchrun rank: its layout
    and stage_span), without loading a weight."""
    from chipspan.chips.job import one_process_per_chip
    from chipspan.chips.plan import stage_span
    from chipspan.distributed.mesh import plan_layout
    from chipspan.distributed.pipeline import VIRTUAL_STAGES

    if not one_process_per_chip(run):
        placement, micro = _placement(run, config)
        return [list(r) for r in placement.layers], micro, False
    world = int(run.chips.chips.split("-")[1]) + 1
    layout = plan_layout(world, 0, run.chips.data_parallel, VIRTUAL_STAGES[run.chips.pipeline_schedule])
    device = torch.device(run.chips.device, 0) if run.chips.device == "emu" else torch.device("cpu")
    span_ = stage_span(run, config, layout.num_stages, device)
    return [list(r) for r in span_.layers], span_.micro_batches, True


@pytest.mark.parametrize("flags", list(_grid()))
def test_plan_shows_the_split_micro_batches_and_path_train_uses(flags, tmp_path, capsys, monkeypatch):
    from chipspan.cli import main

    if "emu" in flags and not emu.is_available():
        pytest.skip("the emu device cannot be built here (no C++ compiler?)")
    for name in ("WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    folder = _model_folder(tmp_path, **HEAVY_HEAD)
    run = _train_run(folder, *flags)
    assert main(["plan", "--model_name_or_path", str(folder), "--cutoff_len", "256", *flags, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    try:
        trained = _what_train_runs(run, ModelConfig.from_folder(folder))
    finally:
        if emu._ext is not None:
            emu.set_memory_limit(None)
    layers = [list(range(c["layers"][0], c["layers"][1] + 1)) for c in plan["chips"]]
    assert (layers, plan["micro_batches"], plan["one_process_per_chip"]) == trained
    assert plan["fits"] is (True if "emu" in flags else None)


def test_without_a_chips_memory_train_balances_the_layers_as_the_plan_does(tmp_path):
    folder = _model_folder(tmp_path, **HEAVY_HEAD)
    placement, _ = _placement(
        _train_run(folder, "--finetuning_type", "full", "--device", "cpu", "--chips", "0-1"),
        ModelConfig.from_folder(folder),
    )
    assert [len(r) for r in placement.layers] == [7, 1]  # the head's chip is the fullest: not 4 + 4


@pytest.mark.parametrize(
    "launcher, environ, path",
    [
        (None, {}, "one process"),
        ("torchrun", {}, "relaunch"),
        ("torchrun", {"LOCAL_RANK": "0", "WORLD_SIZE": "1"}, "rank"),
        (None, {"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "rank"),
        (None, {"LOCAL_RANK": "0", "WORLD_SIZE": "1"}, "one process"),  # torchrun of one process, no --launcher
        (None, {"WORLD_SIZE": "2"}, "one process"),  # a stray WORLD_SIZE is not torchrun
    ],
)
def test_one_rule_picks_the_path_for_plan_train_and_the_cli(launcher, environ, path, tmp_path, monkeypatch, capsys):
    from chipspan import cli
    from chipspan.chips.job import one_process_per_chip
    from chipspan.distributed import launch, recipe

    for name in ("WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    taken = []
    monkeypatch.setattr(recipe, "run_distributed_train", lambda run: taken.append("rank"))
    monkeypatch.setattr(launch, "relaunch", lambda run, flags: taken.append("relaunch") or 0)
    monkeypatch.setattr("chipspan.train.recipe.run_train", lambda run: taken.append("one process"))
    folder = _model_folder(tmp_path, **HEAVY_LAYERS)
    flags = ["--chips", "0-1", *(["--launcher", launcher] if launcher else [])]
    assert cli.main(["train", "--model_name_or_path", str(folder), *flags]) == 0
    assert taken == [path]
    assert cli.main(["plan", "--model_name_or_path", str(folder), *flags, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["one_process_per_chip"]
    assert shown == one_process_per_chip(_train_run(folder, *flags)) == (path != "one process")


# --- planning touches no device, and chips/ does not import train/ ---------------------------------


def _python(code: str) -> str:
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.multiprocess
def test_planning_imports_no_plugin_and_starts_no_emulated_chip(tmp_path):
    folder = _model_folder(tmp_path, **HEAVY_LAYERS)
    code = f"""
import sys
from chipspan.args import parse_run_arguments
from chipspan.chips.plan import make_plan
for device in ("emu", "tpu", "npu"):
    for extra in ([], ["--launcher", "torchrun"]):
        flags = ["--model_name_or_path", {str(folder)!r}, "--device", device, "--chips", "0-1", "--fp16", *extra]
        make_plan(parse_run_arguments([*flags, "--chip_memory", "1GiB"], {{}}))
        make_plan(parse_run_arguments(flags, {{}}))
emu = sys.modules.get("chipspan.emu")
print(sorted(m for m in ("torch_tpu", "torch_npu") if m in sys.modules), emu is not None and emu._ext is not None)
"""
    assert _python(code) == "[] False"


@pytest.mark.multiprocess
def test_the_plan_imports_nothing_from_train():
    code = "import sys, chipspan.chips.plan; print(sorted(m for m in sys.modules if m.startswith('chipspan.train')))"
    assert _python(code) == "[]"
