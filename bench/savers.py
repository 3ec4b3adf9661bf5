"""What each memory saver costs and keeps, side by side: the demo's job (SmolLM2-135M-Instruct,
chipbot_identity, two emulated chips) trained with each saver and without.

    python bench/savers.py                  # LoRA (16-bit vs 4/8-bit base) and full (AdamW variants)
    python bench/savers.py --steps 60 --only lora
    python bench/savers.py --only lora-all  # LoRA on every linear layer, as QLoRA trains
    python bench/savers.py --only full-in-backward  # --optimizer_in_bwd, against the unclipped plain job

Each variant runs as its own `chipspan train` process, one after another, so the emulated chips'
peak counters start at zero; the table gives the eval loss before training (LoRA: what the
quantized base's rounding alone costs), the last logged loss (the mean over the last
``--logging_steps`` steps), the mean training loss, seconds per step and the fullest chip's peak,
each as a ratio to the variant's plain job (the first of its group). The machines are shared and
noisy: compare ratios from one run, not times across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chipspan.assets import demo_model_dir  # noqa: E402
from chipspan.demo import train_command  # noqa: E402

GROUPS = {
    "lora": [
        ("fp32 base (plain)", []),
        ("4-bit nf4 base", ["--quantization_bit", "4"]),
        ("8-bit base", ["--quantization_bit", "8"]),
    ],
    "lora-all": [  # QLoRA's recipe: an adapter on every linear layer, which can make up for the base's rounding
        ("fp32 base (plain)", ["--lora_target", "all"]),
        ("4-bit nf4 base", ["--lora_target", "all", "--quantization_bit", "4"]),
        ("8-bit base", ["--lora_target", "all", "--quantization_bit", "8"]),
    ],
    "full": [
        ("fp32 AdamW (plain)", []),
        ("8-bit AdamW", ["--optim", "adamw_8bit"]),
        ("pure bf16 + stochastic rounding", ["--pure_bf16"]),
        ("pure bf16, nearest rounding", ["--pure_bf16", "--stochastic_rounding", "false"]),
        ("host-offloaded AdamW", ["--offload_optimizer"]),
    ],
    "full-in-backward": [  # stepping inside backward cannot clip by the global norm: compared unclipped
        ("fp32 AdamW, no clipping (plain)", ["--max_grad_norm", "0"]),
        ("stepped in backward", ["--max_grad_norm", "0", "--optimizer_in_bwd"]),
        (
            "pure bf16, 8-bit AdamW, in backward",
            ["--max_grad_norm", "0", "--optimizer_in_bwd", "--pure_bf16", "--optim", "adamw_8bit"],
        ),
    ],
}
FULL_LEARNING_RATE = "2e-5"  # the demo's 2e-3 is LoRA's


def job(model: Path, out: Path, group: str, steps: int, extra: list[str]) -> list[str]:
    """The demo's `chipspan train` flags on emulated chips for ``steps`` steps, as ``group`` trains."""
    argv = train_command(model, out)
    argv[argv.index("--device") + 1] = "emu"
    argv += ["--max_steps", str(steps), "--logging_steps", "5"]
    if group.startswith("full"):
        argv[argv.index("--finetuning_type") + 1] = "full"
        argv[argv.index("--learning_rate") + 1] = FULL_LEARNING_RATE
    return argv + extra


def loss_before(argv: list[str], threads: int) -> float:
    """The eval loss of ``argv``'s model over all its rows before any training: what the base's
    rounding alone costs (``train --do_eval`` without ``--do_train``)."""
    argv = [flag for flag in argv if flag != "--do_train"] + ["--do_eval"]
    out = Path(argv[argv.index("--output_dir") + 1] + "-before")
    argv[argv.index("--output_dir") + 1] = str(out)
    _train(argv, threads)
    return json.loads((out / "all_results.json").read_text())["eval_loss"]


def _train(argv: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "chipspan", "train", *argv], env=env, check=True, capture_output=True)


def run(argv: list[str], threads: int) -> dict:
    """Train in a new process; its results, last logged loss and fullest chip's peak."""
    _train(argv, threads)
    out = Path(argv[argv.index("--output_dir") + 1])
    results = json.loads((out / "all_results.json").read_text())
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    peaks = [value for key, value in results.items() if key.endswith("_peak_memory_bytes")]
    return {
        "last_loss": losses[-1],
        "train_loss": results["train_loss"],
        "seconds_per_step": results["train_runtime"] / log[-1]["current_steps"],
        "peak": max(peaks) if peaks else float("nan"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--only", choices=tuple(GROUPS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    model = Path(demo_model_dir(None))
    print(
        f"{'variant':36s} {'before':>7} {'ratio':>6} {'last loss':>10} {'ratio':>6} {'mean loss':>10} {'ratio':>6}"
        f" {'s/step':>7} {'ratio':>6} {'peak MiB':>9} {'ratio':>6}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        for group, variants in GROUPS.items():
            if args.only and group != args.only:
                continue
            plain = None
            for i, (name, extra) in enumerate(variants):
                argv = job(model, Path(scratch) / f"{group}{i}", group, args.steps, extra)
                measured = run(argv, args.threads)
                # full fine-tuning starts from the same weights whatever the saver
                measured["before"] = loss_before(argv, args.threads) if not group.startswith("full") else float("nan")
                plain = plain or measured
                print(
                    f"{group + ': ' + name:36s} {measured['before']:7.4f} {measured['before'] / plain['before']:6.3f}"
                    f" {measured['last_loss']:10.4f} {measured['last_loss'] / plain['last_loss']:6.3f}"
                    f" {measured['train_loss']:10.4f} {measured['train_loss'] / plain['train_loss']:6.3f}"
                    f" {measured['seconds_per_step']:7.2f} {measured['seconds_per_step'] / plain['seconds_per_step']:6.2f}"
                    f" {measured['peak'] / 2**20:9.1f} {measured['peak'] / plain['peak']:6.3f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
