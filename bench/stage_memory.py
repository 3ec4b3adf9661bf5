"""Predicted against measured peak memory of each stage process under torchrun (gloo, CPU).

    python bench/stage_memory.py [--schedule 1f1b] [--micro_batches 4] [--finetuning full] [--seq 256]

Two stage processes train a small random Llama (4 layers, hidden 256, vocab 4096, fp32, no
recomputation) through chipspan's own pipeline (``chipspan.distributed``: the schedule, the clip,
AdamW) with one example per micro-batch. In each process ``memory_check.Tracker`` follows every
storage the process creates, from the stage's weights on; its peak over the second optimizer step
(AdamW's moments alive) stands beside the plan's estimate for that stage
(``chipspan.chips.memory.split_estimates`` with the schedule's micro-batches in flight: under 1F1B
the first of 2 stages holds 2 micro-batches at once and the last 1; under GPipe both hold all).

AdamW runs its ``foreach`` path, as torch picks it on accelerators and as the plan prices it (on the
CPU torch would pick the per-parameter loop). ``measure_stages`` is importable (tests/test_plan.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SHAPE = {
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}


def measure_stages(jobs: list[dict], out: Path) -> list[list[dict]]:
    """Run each job (``finetuning``, ``schedule``, ``micro_batches``, ``seq``) on 2 stage processes;
    per job, each stage's {stage, layers, in_flight, predicted, measured} in bytes."""
    (out / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            __file__,
            "--worker",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return [[json.loads((out / f"job{j}-stage{s}.json").read_text()) for s in range(2)] for j in range(len(jobs))]


def worker(out: Path) -> None:
    import torch.distributed as dist
    from memory_check import Tracker

    from chipspan.args import parse_run_arguments
    from chipspan.chips.job import job_of
    from chipspan.chips.memory import Schedule, split_estimates
    from chipspan.chips.placement import split_layers
    from chipspan.distributed.mesh import plan_layout, start
    from chipspan.distributed.pipeline import VIRTUAL_STAGES
    from chipspan.distributed.runner import RankRunner
    from chipspan.distributed.trainable import prepare_stages
    from chipspan.models.config import ModelConfig
    from chipspan.models.decoder import CausalLM
    from chipspan.precision import Precision, choose_precision
    from chipspan.train.optim import build_optimizer
    from chipspan.train.step import TrainStep

    torch.set_num_threads(1)
    rank, device = int(os.environ["RANK"]), torch.device("cpu")
    config = ModelConfig.from_dict(SHAPE)
    for index, job in enumerate(json.loads((out / "jobs.json").read_text())):
        micro, schedule = job["micro_batches"], job["schedule"]
        run = parse_run_arguments(
            [
                "--do_train",
                "--model_name_or_path",
                "unused",
                "--dataset",
                "x",
                "--output_dir",
                "x",
                "--finetuning_type",
                job["finetuning"],
                "--lora_target",
                "q_proj,v_proj",
                "--cutoff_len",
                str(job["seq"]),
                "--per_device_train_batch_size",
                str(micro),
                "--micro_batches",
                str(micro),
                "--pipeline_schedule",
                schedule,
                "--disable_gradient_checkpointing",
                "--launcher",
                "torchrun",
            ],
            {},
        )
        layout = plan_layout(2, rank, 1, VIRTUAL_STAGES[schedule])
        mesh = start(layout, device, run.training.ddp_timeout)
        split = split_layers(config.num_hidden_layers, layout.num_stages)
        tracker = Tracker()
        with tracker:
            torch.manual_seed(0)
            pieces = [
                CausalLM(config, layers=split[s], embed=s == 0, head=s == layout.num_stages - 1) for s in layout.stages
            ]
            prepare_stages(pieces, config, run.finetuning, None)
            precision = Precision(choose_precision(run, device.type))
            runner = RankRunner(layout, device, mesh, pieces, schedule, micro, micro, 0, torch.float32, precision)
            optimizer, scheduler = build_optimizer(pieces, run.training, steps=100)
            for group in optimizer.param_groups:
                group["foreach"] = True  # what torch picks on an accelerator, and what the plan prices
            step = TrainStep(runner, optimizer, scheduler, precision, 1.0, run.training.learning_rate)
            ids = torch.randint(0, config.vocab_size, (micro, job["seq"]), generator=torch.Generator().manual_seed(1))
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            for number in (1, 2):
                if number == 2:
                    tracker.reset_peaks()
                tracker.phase = "step"
                step(number, [batch], print)
            measured = tracker.peak(device)
        stages = split_estimates(config, split, job_of(run, choose_precision(run, "cpu")), Schedule(schedule, micro))
        for s in layout.stages:
            (out / f"job{index}-stage{s}.json").write_text(
                json.dumps(
                    {
                        "stage": s,
                        "layers": [split[s].start, split[s].stop - 1],
                        "in_flight": stages[s].in_flight,
                        "predicted": stages[s].total,
                        "measured": measured,
                    }
                )
            )
        del pieces, runner, optimizer, scheduler, step
        dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="1f1b", choices=("gpipe", "1f1b"))
    parser.add_argument("--micro_batches", type=int, default=4)
    parser.add_argument("--finetuning", default="full", choices=("lora", "full", "freeze"))
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(Path(args.worker))
        return 0
    job = {
        "finetuning": args.finetuning,
        "schedule": args.schedule,
        "micro_batches": args.micro_batches,
        "seq": args.seq,
    }
    with tempfile.TemporaryDirectory() as folder:
        stages = measure_stages([job], Path(folder))[0]
    print(
        f"{args.schedule}, {args.micro_batches} micro-batches of 1 x {args.seq} tokens, {args.finetuning}, fp32, "
        f"2 stage processes (h={SHAPE['hidden_size']}, {SHAPE['num_hidden_layers']} layers)"
    )
    print(f"{'stage':>5} {'layers':>7} {'m':>3} {'predicted':>10} {'measured':>10} {'ratio':>6}")
    for s in stages:
        print(
            f"{s['stage']:>5} {s['layers'][0]:>3}-{s['layers'][1]:<3} {s['in_flight']:>3} "
            f"{s['predicted'] / 2**20:10.2f} {s['measured'] / 2**20:10.2f} {s['predicted'] / s['measured']:6.3f}"
        )
    print("(MiB; m: micro-batches in flight; measured: the stage process's tracked peak over one optimizer step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
