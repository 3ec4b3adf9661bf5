"""chipspan on a CUDA GPU, checked in one command: CPU parity, bf16, two chips, speed and memory.

    python bench/gpu_check.py [--tokenizer DIR] [--workdir DIR] [--json PATH]
    python bench/gpu_check.py --dry ...      # the same pipeline on the CPU with a tiny model

It makes a random-weight Llama of SmolLM2-135M's shape (the vocabulary is the tokenizer's) with
chipspan's own model code, and a pretraining dataset from chipspan's demo data (the rows of
``chipspan/demo_data/identity.json`` joined into long texts, cut into ``cutoff_len`` blocks, so every
batch is full), runs ``python -m chipspan train --stage pt`` as a user would, and prints one
markdown table:

- parity: LoRA and full fine-tuning in fp32 with ``--device cuda`` against the same run with
  ``--device cpu``: the largest relative difference of the per-step losses (``trainer_log.jsonl``),
  passing within PARITY_TOLERANCE;
- bf16: a ``--bf16`` LoRA run on cuda against the fp32 one, passing within BF16_TOLERANCE;
- two chips: ``--chips 0-1`` in one process, and 2 stage processes under torchrun (nccl), against
  one chip, within PARITY_TOLERANCE; skipped with fewer than 2 GPUs;
- speed: tokens/s of a LoRA and of a full ``--bf16`` run, over the steps after the warm-up ones;
- memory: each chip's peak (``chipN_peak_memory_bytes`` of ``train_results.json``, torch's
  ``max_memory_allocated``) over the peak ``chipspan plan`` predicts for the same flags;
- transformers + PEFT: chipspan's LoRA tokens/s over a plain Hugging Face loop's (LlamaForCausalLM,
  PEFT LoRA on q_proj,v_proj, AdamW, the same blocks, batch, steps and precision); skipped when
  transformers or peft is missing.

``--dry`` (automatic without CUDA) runs all of it on the CPU with a tiny model: ``cpu`` stands in for
``cuda``, so the parity rows compare the CPU with itself and must agree exactly (the CPU ignores
``--bf16`` and computes in fp32), and the speed and memory rows are marked dry.

Each run's output is in ``runs/NAME.log`` of the work folder: a temporary one, removed at the end,
or ``--workdir`` (a new or empty folder), which is kept. Nothing else is written but ``--json``
(and torchrun's own files in the system's temporary folder). Exit status: 0 when no check failed,
1 when a parity row failed, 2 for bad input or a run that failed (one line saying which).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chipspan import assets, devices  # noqa: E402
from chipspan.args import parse_run_arguments  # noqa: E402
from chipspan.chips.plan import make_plan  # noqa: E402
from chipspan.data.loader import load_dataset_split  # noqa: E402
from chipspan.demo import DEMO_DATA  # noqa: E402
from chipspan.errors import ChipspanError  # noqa: E402
from chipspan.models.config import ModelConfig  # noqa: E402
from chipspan.models.decoder import CausalLM  # noqa: E402
from chipspan.models.tokenizer import Tokenizer  # noqa: E402
from chipspan.models.weights import model_state_dict, save_weights  # noqa: E402
from chipspan.precision import Precision, choose_precision  # noqa: E402

PARITY_TOLERANCE = 1e-3  # fp32 on two devices, or over two chips: largest relative difference of a step's loss
BF16_TOLERANCE = 2e-2  # --bf16 (bf16 frozen base, bf16 autocast, fp32 adapters) against fp32
LEARNING_RATE = {"lora": "1e-3", "full": "1e-4"}  # high enough that the loss moves in a handful of steps
LORA_FLAGS = ["--lora_target", "q_proj,v_proj", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0"]
DATASET = "gpu_check_text"
RUN_TIMEOUT_S = 300  # the longest one chipspan run may take
SOPHGO_VARIABLES = ("USE_SOPHGO", "SOPHGO_SPLIT", "CHIPS")  # LLaMA-Factory 0.5's chip settings: the flags decide here
MIB = 2**20

SMOLLM2_135M = dict(  # SmolLM2-135M's config.json, less its vocabulary
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class Sizes:
    """The model's shape (config.json's sizes) and each run's length: steps of ``batch`` rows of ``cutoff`` tokens."""

    shape: dict
    parity_steps: int
    parity_batch: int
    parity_cutoff: int
    speed_steps: int
    speed_warmup: int  # first steps of a speed run left out of its tokens/s
    speed_batch: int
    speed_cutoff: int

    @property
    def dataset_tokens(self) -> int:
        """Tokens the dataset holds: four batches of the speed runs."""
        return 4 * self.speed_batch * self.speed_cutoff


GPU = Sizes(
    SMOLLM2_135M,
    parity_steps=5,
    parity_batch=2,
    parity_cutoff=128,
    speed_steps=40,
    speed_warmup=10,
    speed_batch=8,
    speed_cutoff=1024,
)
DRY = Sizes(
    TINY,
    parity_steps=3,
    parity_batch=2,
    parity_cutoff=32,
    speed_steps=6,
    speed_warmup=2,
    speed_batch=2,
    speed_cutoff=32,
)


class CheckError(Exception):
    """Bad input, or a run that failed: printed as one line."""


@dataclass
class Row:
    """One line of the table; ``numbers`` holds the raw values behind ``measured`` (JSON only)."""

    key: str  # the same in every mode
    check: str
    measured: str
    reference: str
    result: str  # pass, FAIL, measured, dry, or skipped: why
    numbers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    """Where the check runs: its model and data, where runs and their data cache go, the device
    standing for cuda, the sizes."""

    model: Path
    data: Path
    runs: Path
    cache: Path  # CHIPSPAN_CACHE of the runs: their encoded data
    device: str  # cuda, or cpu in a dry run
    sizes: Sizes
    dry: bool


# --- the model and the data ------------------------------------------------------------------------


def find_tokenizer(given: str | None) -> Path:
    """``--tokenizer``, else a tokenizer chipspan.assets already fetched (SmolLM2's, else Llama 2's); no network."""
    if given is not None:
        if not (Path(given) / "tokenizer.json").is_file():
            raise CheckError(f"--tokenizer {given} holds no tokenizer.json: pass a Hugging Face tokenizer folder")
        return Path(given)
    cache = assets.resolve_cache_dir()
    for name in (assets.DEMO_MODEL, assets.LLAMA2_TOKENIZER):
        if (cache / name / "tokenizer.json").is_file():
            return cache / name
    raise CheckError(
        f"no tokenizer: pass --tokenizer DIR (a folder with tokenizer.json), or fetch SmolLM2's into {cache} "
        "where there is network: python -c 'from chipspan import assets; assets.demo_model_dir()'"
    )


def make_model(folder: Path, tokenizer: Tokenizer, shape: dict, seed: int = 0) -> ModelConfig:
    """A random-weight Llama of ``shape`` with ``tokenizer``'s vocabulary in ``folder`` (config.json,
    model.safetensors, the tokenizer), initialised as transformers initialises Llama: matrices
    normal with std 0.02, norms 1."""
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tokenizer.vocab_size,
        **shape,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "float32",
    }
    config = ModelConfig.from_dict(raw)
    model = CausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.02, generator=generator)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    save_weights(model_state_dict(model), folder)
    tokenizer.save(folder)
    return config


def make_dataset(folder: Path, tokenizer: Tokenizer, tokens: int) -> None:
    """A dataset folder (dataset_info.json and one file) of texts holding at least ``tokens`` tokens:
    the rows of chipspan's identity demo data joined into one text, repeated."""
    rows = json.loads((DEMO_DATA / "identity.json").read_text(encoding="utf-8"))
    text = "\n\n".join(f"{row['instruction']}\n{row['output']}" for row in rows)
    copies = math.ceil(tokens / len(tokenizer.encode(text))) + 1
    folder.mkdir(parents=True)
    (folder / f"{DATASET}.json").write_text(json.dumps([{"text": text}] * copies, ensure_ascii=False))
    info = {DATASET: {"file_name": f"{DATASET}.json", "columns": {"prompt": "text"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")


# --- running chipspan -----------------------------------------------------------------------------


def train_flags(setup: Setup, name: str, finetuning: str, device: str, speed: bool, *extra: str) -> list[str]:
    """``chipspan train`` flags of one run into ``setup.runs/name``: a parity run (fp32, a handful of
    steps) or a speed run, logging every step, no checkpoints."""
    sizes = setup.sizes
    steps, batch, cutoff = (
        (sizes.speed_steps, sizes.speed_batch, sizes.speed_cutoff)
        if speed
        else (sizes.parity_steps, sizes.parity_batch, sizes.parity_cutoff)
    )
    return [
        *("--stage", "pt", "--do_train", "--model_name_or_path", str(setup.model)),
        *("--dataset", DATASET, "--dataset_dir", str(setup.data), "--cutoff_len", str(cutoff)),
        *("--finetuning_type", finetuning, *(LORA_FLAGS if finetuning == "lora" else [])),
        *("--output_dir", str(setup.runs / name), "--overwrite_output_dir"),
        *("--per_device_train_batch_size", str(batch), "--max_steps", str(steps)),
        *("--learning_rate", LEARNING_RATE[finetuning], "--lr_scheduler_type", "constant"),
        *("--logging_steps", "1", "--save_steps", "0", "--seed", "0", "--disable_gradient_checkpointing"),
        *("--device", device, *extra),
    ]


def run_environment(cache: Path) -> dict[str, str]:
    """This process's environment for the runs: chipspan importable from this checkout, its data cache
    in ``cache``, no Sophgo chip settings."""
    env = {k: v for k, v in os.environ.items() if k not in SOPHGO_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["CHIPSPAN_CACHE"] = str(cache)
    return env


def train(setup: Setup, flags: list[str]) -> Path:
    """Run ``python -m chipspan train FLAGS``; its output folder. Its output goes to ``NAME.log`` beside
    that folder; a run that fails or outlives RUN_TIMEOUT_S raises CheckError with its last line."""
    out = Path(flags[flags.index("--output_dir") + 1])
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"running {out.name} ...", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "chipspan", "train", *flags]
    with open(log, "w") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=run_environment(setup.cache), start_new_session=True
        )
    try:
        code = process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CheckError(f"run {out.name} took more than {RUN_TIMEOUT_S} s (its output: {log})") from None
    finally:
        if process.poll() is None:  # timed out or interrupted: stop the run and what it started (torchrun's ranks)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if code != 0:
        lines = log.read_text(errors="replace").strip().splitlines() or ["no output"]
        errors = [line for line in lines if line.startswith("chipspan: error:")]
        raise CheckError(f"run {out.name} failed (exit {code}): {(errors or lines)[-1]}")
    return out


def step_losses(out: Path) -> list[float]:
    """The loss of every step of the run in ``out`` (trainer_log.jsonl, logged every step)."""
    lines = (out / "trainer_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


# --- the rows -------------------------------------------------------------------------------------


def max_relative_difference(losses: list[float], reference: list[float]) -> float:
    """max over steps of |loss - reference| / |reference|; the runs must have the same steps."""
    if len(losses) != len(reference):
        raise CheckError(f"runs logged {len(losses)} and {len(reference)} steps; expected the same")
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference))


def parity_row(key: str, check: str, run: Path, reference: Path, tolerance: float) -> Row:
    """Whether the per-step losses of ``run`` stay within ``tolerance`` (relative) of ``reference``'s."""
    losses, reference_losses = step_losses(run), step_losses(reference)
    difference = max_relative_difference(losses, reference_losses)
    return Row(
        key,
        check,
        f"max rel. diff {difference:.1e} over {len(losses)} steps",
        f"<= {tolerance:.0e}",
        "pass" if difference <= tolerance else "FAIL",
        {"max_relative_difference": difference, "losses": losses, "reference_losses": reference_losses},
    )


def can_span_two(device: str) -> bool:
    """Whether two chips exist: on the CPU every chip maps onto it; else two devices are needed."""
    return device in devices.SINGLE_DEVICE_TYPES or devices.device_count(device) >= 2


TWO_CHIPS = {  # key -> (what it checks, its flags beyond one chip's)
    "two-chips": ("LoRA, 2 chips in one process vs 1 chip", ["--chips", "0-1"]),
    "two-stages": ("LoRA, 2 stage processes (torchrun) vs 1 process", ["--chips", "0-1", "--launcher", "torchrun"]),
}


def parity_rows(setup: Setup) -> list[Row]:
    """The parity, bf16 and two-chip rows."""
    device = setup.device

    def run(name: str, finetuning: str, on: str, *extra: str) -> Path:
        return train(setup, train_flags(setup, name, finetuning, on, False, *extra))

    lora = run("device-lora-fp32", "lora", device)
    rows = [
        parity_row(
            "parity-lora", f"LoRA fp32: {device} vs cpu", lora, run("cpu-lora-fp32", "lora", "cpu"), PARITY_TOLERANCE
        ),
        parity_row(
            "parity-full",
            f"full fp32: {device} vs cpu",
            run("device-full-fp32", "full", device),
            run("cpu-full-fp32", "full", "cpu"),
            PARITY_TOLERANCE,
        ),
    ]
    bf16 = train_flags(setup, "device-lora-bf16", "lora", device, False, "--bf16")
    check = f"LoRA --bf16 ({precision_name(bf16, device)} on {device}) vs fp32"
    rows.append(parity_row("bf16-lora", check, train(setup, bf16), lora, BF16_TOLERANCE))
    for key, (what, extra) in TWO_CHIPS.items():
        check = f"{what}, {device}"
        if can_span_two(device):
            rows.append(
                parity_row(key, check, run(f"device-lora-{key}", "lora", device, *extra), lora, PARITY_TOLERANCE)
            )
        else:
            shown = devices.device_count(device)
            rows.append(Row(key, check, "-", f"<= {PARITY_TOLERANCE:.0e}", f"skipped: needs 2 GPUs, {shown} here"))
    return rows


def steady_tokens_per_second(out: Path, warmup: int, tokens_per_step: int) -> float:
    """tokens/s of the run in ``out`` over its steps after the first ``warmup``, from the cumulative
    tokens/s logged at each step (every batch is full: ``tokens_per_step`` tokens a step)."""
    lines = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    first, last = lines[warmup - 1], lines[-1]

    def elapsed(line: dict) -> float:  # seconds since training started
        return line["current_steps"] * tokens_per_step / line["tokens_per_second"]

    return (last["current_steps"] - first["current_steps"]) * tokens_per_step / (elapsed(last) - elapsed(first))


def precision_name(flags: list[str], device: str) -> str:
    """What the run computes in on ``device``: bf16, fp16 or fp32 (the CPU ignores --bf16)."""
    choice = choose_precision(parse_run_arguments(flags, {}), device)
    return str(choice.compute_dtype).removeprefix("torch.").replace("bfloat", "bf").replace("float", "fp")


def speed_row(key: str, label: str, out: Path, setup: Setup) -> tuple[Row, float]:
    """The tokens/s row of a speed run, and its tokens/s."""
    sizes = setup.sizes
    speed = steady_tokens_per_second(out, sizes.speed_warmup, sizes.speed_batch * sizes.speed_cutoff)
    steps = f"steps {sizes.speed_warmup + 1}-{sizes.speed_steps}, batch {sizes.speed_batch} x {sizes.speed_cutoff}"
    row = Row(key, label, f"{speed:,.0f} tokens/s", steps, "dry" if setup.dry else "measured", {"tokens_per_s": speed})
    return row, speed


def memory_rows(key: str, label: str, out: Path, flags: list[str], setup: Setup) -> list[Row]:
    """Each chip's peak in the run in ``out`` over the peak ``chipspan plan`` predicts for its ``flags``."""
    plan = make_plan(parse_run_arguments(flags, {}))
    measured = json.loads((out / "train_results.json").read_text())
    rows = []
    for i, chip in enumerate(plan.chips):
        predicted = chip.total
        peak = measured.get(f"chip{i}_peak_memory_bytes")
        reference = f"plan: {predicted / MIB:,.1f} MiB"
        check = f"{label}: chip {i} peak memory"
        if peak is None:
            why = f"{'dry' if setup.dry else 'skipped'}: {setup.device} reports no memory"
            rows.append(Row(f"{key}-chip{i}", check, "-", reference, why))
            continue
        ratio = peak / predicted
        numbers = {"measured_bytes": peak, "predicted_bytes": predicted, "ratio": ratio}
        shown = f"{peak / MIB:,.1f} MiB, {ratio:.3f} of the plan"
        rows.append(Row(f"{key}-chip{i}", check, shown, reference, "measured", numbers))
    return rows


def hf_tokens_per_second(flags: list[str], setup: Setup) -> float:
    """tokens/s of a plain transformers + PEFT loop doing what chipspan's LoRA run ``flags`` does: the
    same blocks, batch, steps and precision (LlamaForCausalLM, PEFT LoRA r8 alpha 16 on q_proj,v_proj,
    AdamW, clipping at 1.0), over the steps after the warm-up ones. ImportError without them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; the GPU machine has no network
    import peft
    import transformers

    run = parse_run_arguments(flags, {})
    choice = choose_precision(run, setup.device)
    tokenizer = Tokenizer.from_folder(setup.model)
    blocks = load_dataset_split(run.data, tokenizer, "pt", run.training.seed, use_cache=False).train
    ids = torch.from_numpy(blocks.input_ids.astype("int64")).view(len(blocks), -1)
    model = transformers.LlamaForCausalLM.from_pretrained(setup.model, dtype=choice.base_dtype).to(setup.device)
    lora = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.to(choice.trained_dtype)
    optimizer = torch.optim.AdamW(trainable, lr=run.training.learning_rate, weight_decay=run.training.weight_decay)
    batch, cutoff, warmup = run.training.per_device_train_batch_size, ids.shape[1], setup.sizes.speed_warmup
    started = time.perf_counter()
    for step in range(run.training.max_steps):
        if step == warmup:
            started = time.perf_counter()
        batch_ids = ids[(torch.arange(batch) + step * batch) % len(ids)].to(setup.device)
        with Precision(choice).autocast():
            loss = model(input_ids=batch_ids, labels=batch_ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, run.training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the step, as chipspan's loop does
    return (run.training.max_steps - warmup) * batch * cutoff / (time.perf_counter() - started)


def hf_row(flags: list[str], chipspan_speed: float, setup: Setup) -> Row:
    """chipspan's LoRA tokens/s over the transformers + PEFT loop's, or skipped when they are missing."""
    check = f"LoRA {precision_name(flags, setup.device)}: chipspan / transformers+PEFT tokens/s"
    try:
        reference = hf_tokens_per_second(flags, setup)
    except ImportError as exc:
        return Row("vs-hf-peft", check, "-", "-", f"skipped: {exc}")
    ratio = chipspan_speed / reference
    numbers = {"ratio": ratio, "chipspan_tokens_per_s": chipspan_speed, "hf_peft_tokens_per_s": reference}
    shown = f"{ratio:.2f}x ({chipspan_speed:,.0f} vs {reference:,.0f})"
    return Row("vs-hf-peft", check, shown, "same blocks, steps, precision", "dry" if setup.dry else "measured", numbers)


def speed_and_memory_rows(setup: Setup) -> list[Row]:
    """tokens/s and per-chip peak memory of a LoRA and a full --bf16 run, and the transformers + PEFT ratio."""
    rows, speeds, flags = [], {}, {}
    for finetuning in ("lora", "full"):
        flags[finetuning] = train_flags(setup, f"device-{finetuning}-speed", finetuning, setup.device, True, "--bf16")
        out = train(setup, flags[finetuning])
        name = "LoRA" if finetuning == "lora" else "full"
        label = f"{name} {precision_name(flags[finetuning], setup.device)}, {setup.device}"
        row, speeds[finetuning] = speed_row(f"speed-{finetuning}", f"{label}: speed", out, setup)
        rows += [row, *memory_rows(f"memory-{finetuning}", label, out, flags[finetuning], setup)]
    rows.append(hf_row(flags["lora"], speeds["lora"], setup))
    return rows


# --- the table and the command line ---------------------------------------------------------------


def render(rows: list[Row]) -> str:
    """The rows as one markdown table."""
    lines = ["| check | measured | reference | result |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.measured} | {r.reference} | {r.result} |" for r in rows]
    return "\n".join(lines)


def prepare_workdir(given: str | None, stack: contextlib.ExitStack) -> Path:
    """``--workdir`` (created; refused unless new or empty), else a temporary folder removed at the end."""
    if given is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check-")))
    folder = Path(given)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise CheckError(f"--workdir {folder} is not a new or empty folder: name another one")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check(args: argparse.Namespace) -> list[Row]:
    """Build the model and data, run every check, return the rows."""
    tokenizer = Tokenizer.from_folder(find_tokenizer(args.tokenizer))
    with contextlib.ExitStack() as stack:
        root = prepare_workdir(args.workdir, stack)
        dry = args.dry or not torch.cuda.is_available()
        if dry:
            why = "--dry" if args.dry else "no CUDA device here"
            print(f"dry run ({why}): the CPU stands in for cuda, with a tiny model", file=sys.stderr)
        sizes = DRY if dry else GPU
        setup = Setup(
            root / "model", root / "data", root / "runs", root / "cache", "cpu" if dry else "cuda", sizes, dry
        )
        config = make_model(setup.model, tokenizer, sizes.shape)
        make_dataset(setup.data, tokenizer, sizes.dataset_tokens)
        made = f"model: {config.num_parameters / 1e6:.1f}M parameters, random weights, in {setup.model}"
        print(made, file=sys.stderr)
        return parity_rows(setup) + speed_and_memory_rows(setup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="run on the CPU with a tiny model (automatic without CUDA)")
    parser.add_argument("--tokenizer", metavar="DIR", help="a folder with tokenizer.json (default: chipspan's cache)")
    parser.add_argument("--workdir", metavar="DIR", help="keep the model, data and runs here (a new or empty folder)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows to this file as JSON")
    args = parser.parse_args(argv)
    try:
        if args.json is not None and (Path(args.json).is_dir() or not Path(args.json).resolve().parent.is_dir()):
            raise CheckError(f"--json {args.json} is a folder, or its folder does not exist: name a file")
        rows = check(args)
    except (CheckError, ChipspanError) as exc:
        print(f"gpu_check: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if args.json is not None:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print(render(rows))
    return 1 if any(r.result == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
