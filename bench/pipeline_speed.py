"""Pipeline speed: 2 stage processes (torchrun, 1 thread each) against 1 process (1 thread), same batch.

    python bench/pipeline_speed.py [--steps 3] [--batch 8] [--seq 512] [--schedule 1f1b]

A random Llama-shaped model big enough that the layers dominate (8 layers, hidden 512, vocab 2048),
full fine-tuning, fp32, no gradient checkpointing. The single process runs the whole batch at once
(``SpannedModel`` on one chip); the pipeline splits it into ``--batch`` micro-batches of one row over
2 stages (``chipspan.distributed``). Both time whole optimizer steps (forward, backward, clip, AdamW)
after one warm-up step, one after the other.

Micro-batches of one row pay PyTorch's fixed cost per operation eight times: at ``--seq 128`` that
cost alone held the speed-up to about 1.5x on a quiet 2-core machine, at 512 it was 1.76x.

Prints tokens/s of each, their ratio, and the pipeline's measured bubble: the share of a step each
rank spends outside its stage's forward/backward computations (waiting, sending), beside the ideal
(p - 1) / (m + p - 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from chipspan.models.config import ModelConfig
from chipspan.models.decoder import CausalLM
from chipspan.models.weights import save_weights
from chipspan.precision import Precision, PrecisionChoice
from chipspan.train.optim import build_optimizer
from chipspan.train.step import TrainStep

REPO = Path(__file__).resolve().parents[1]
SHAPE = {
    "model_type": "llama",
    "vocab_size": 2048,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
PRECISION = Precision(PrecisionChoice("cpu", None, False, torch.float32, torch.float32))


def make_model(folder: Path) -> None:
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_dict(SHAPE))
    save_weights(model.state_dict(), folder)
    (folder / "config.json").write_text(json.dumps(SHAPE))


def batch(rows: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, SHAPE["vocab_size"], (rows, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def training_step(runner, stages: list[CausalLM]) -> TrainStep:
    """chipspan's own step (forward, backward, clip, AdamW) over ``runner``, fp32, learning rate 1e-5."""
    from chipspan.args import TrainingArguments

    optimizer, scheduler = build_optimizer(stages, TrainingArguments(learning_rate=1e-5), steps=100)
    return TrainStep(runner, optimizer, scheduler, PRECISION, 1.0, 1e-5)


def time_steps(step, steps: int) -> float:
    """Seconds per step, after one warm-up step."""
    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def single(folder: Path, args) -> dict:
    from chipspan.chips.placement import even_placement
    from chipspan.chips.runner import ChipsRunner
    from chipspan.chips.span import SpannedModel

    model = SpannedModel.load(
        folder, even_placement(ModelConfig.from_folder(folder), [torch.device("cpu")]), torch.float32
    )
    step = training_step(ChipsRunner(model, 1, PRECISION.autocast), list(model.stages))
    data = [batch(args.batch, args.seq)]
    return {"seconds_per_step": time_steps(lambda: step(1, data, print), args.steps)}


def pipelined(folder: Path, args) -> dict:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    from chipspan.args import parse_run_arguments
    from chipspan.chips.placement import split_layers
    from chipspan.distributed.mesh import plan_layout, start
    from chipspan.distributed.runner import RankRunner
    from chipspan.distributed.stage import load_stage
    from chipspan.distributed.trainable import prepare_stages

    busy = [0.0]

    def timed(method):
        def run(*a, **k):
            started = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                busy[0] += time.perf_counter() - started

        return run

    PipelineStage.forward_one_chunk = timed(PipelineStage.forward_one_chunk)
    PipelineStage.backward_one_chunk = timed(PipelineStage.backward_one_chunk)
    run = parse_run_arguments(
        [
            "--do_train",
            "--model_name_or_path",
            str(folder),
            "--dataset",
            "x",
            "--output_dir",
            "x",
            "--finetuning_type",
            "full",
            "--per_device_train_batch_size",
            str(args.batch),
            "--micro_batches",
            str(args.batch),
            "--pipeline_schedule",
            args.schedule,
            "--disable_gradient_checkpointing",
            "--learning_rate",
            "1e-5",
        ],
        {},
    )
    device = torch.device("cpu")
    layout = plan_layout(int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), 1, 1)
    mesh = start(layout, device, run.training.ddp_timeout)
    config = ModelConfig.from_folder(folder)
    split = split_layers(config.num_hidden_layers, layout.num_stages)
    pieces = [load_stage(folder, config, split, s, torch.float32, device) for s in layout.stages]
    prepare_stages(pieces, config, run.finetuning, None)
    micro = run.training.micro_batches
    runner = RankRunner(layout, device, mesh, pieces, args.schedule, micro, args.batch, 0, torch.float32, PRECISION)
    train_step, data = training_step(runner, pieces), [batch(args.batch, args.seq)]

    def step():
        train_step(1, data, print)
        dist.barrier()

    step()  # warm-up
    busy[0] = 0.0
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - started) / args.steps
    result = {"seconds_per_step": seconds, "bubble": 1 - busy[0] / args.steps / seconds}
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    dist.destroy_process_group()
    return {
        "seconds_per_step": max(r["seconds_per_step"] for r in results),
        "bubble": sum(r["bubble"] for r in results) / len(results),
    }


def launch(folder: Path, mode: str, args, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = folder / f"{mode}.json"
    worker = [
        str(Path(__file__)),
        "--worker",
        mode,
        "--model",
        str(folder),
        "--out",
        str(out),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--schedule",
        args.schedule,
    ]
    command = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        if processes > 1
        else [sys.executable]
    ) + worker
    subprocess.run(command, env=env, check=True, capture_output=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="rows per batch = micro-batches in the pipeline")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--worker", choices=["single", "pipeline"])
    parser.add_argument("--model")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        result = (single if args.worker == "single" else pipelined)(Path(args.model), args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_model(folder)
        one = launch(folder, "single", args, 1)
        two = launch(folder, "pipeline", args, 2)
    tokens = args.batch * args.seq
    p, m = 2, args.batch
    print(
        f"model: 8 layers, hidden 512; batch {args.batch} x {args.seq} tokens, full fine-tuning, fp32, 1 thread per process"
    )
    print(
        f"1 process          : {tokens / one['seconds_per_step']:8.1f} tokens/s ({one['seconds_per_step']:.2f} s/step)"
    )
    print(
        f"2 stages ({args.schedule:>9}): {tokens / two['seconds_per_step']:8.1f} tokens/s ({two['seconds_per_step']:.2f} s/step), "
        f"m = {m} micro-batches"
    )
    print(f"speed-up           : {one['seconds_per_step'] / two['seconds_per_step']:.2f}x")
    print(f"bubble             : measured {two['bubble']:.3f}, ideal (p-1)/(m+p-1) = {(p - 1) / (m + p - 1):.3f}")
    print(f"machine load (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
