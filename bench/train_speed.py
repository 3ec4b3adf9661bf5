"""LoRA training speed: chipspan against a bare transformers + PEFT loop, side by side in one run.

    python bench/train_speed.py [--steps 20] [--rounds 2] [--cutoff 512] [--chips 1]

The same SmolLM2-135M-Instruct (fetched and converted as the demo does), the same examples
(alpaca_zh_demo from LLaMA-Factory's demo data, fetched as the tests fetch it; `default` template, batch 1), LoRA q_proj,v_proj r8, AdamW,
no gradient checkpointing. The two loops take turns, ``--steps`` optimizer steps each per round,
so machine noise hits both alike; it prints tokens/s for each round and the ratio of the totals.
Needs transformers and peft (the test extras).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from chipspan.adapters.lora import inject_lora
from chipspan.assets import demo_model_dir, fetch_demo_datasets
from chipspan.chips.placement import even_placement
from chipspan.chips.runner import ChipsRunner
from chipspan.chips.span import SpannedModel
from chipspan.data import load_examples
from chipspan.models.config import ModelConfig
from chipspan.models.tokenizer import Tokenizer
from chipspan.precision import Precision, PrecisionChoice
from chipspan.train.step import TrainStep


def chipspan_step_fn(folder: Path, chips: int):
    placement = even_placement(ModelConfig.from_folder(folder), [torch.device("cpu")] * chips)
    model = SpannedModel.load(folder, placement, torch.float32)
    for stage in model.stages:
        inject_lora(stage, "q_proj,v_proj", r=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    precision = Precision(PrecisionChoice("cpu", None, False, torch.float32, torch.float32))
    train_step = TrainStep(ChipsRunner(model, 1, precision.autocast), optimizer, schedule, precision, 1.0, 1e-4)
    train_step.set_training(True)
    number = [0]

    def step(ids: torch.Tensor, labels: torch.Tensor) -> float:
        """chipspan's own training step (chipspan.train.step), as `chipspan train` runs it."""
        number[0] += 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
        return train_step(number[0], [batch], print)[0]

    return step


def reference_step_fn(folder: Path):
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> float:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed(step, batches) -> tuple[float, int]:
    """Seconds and tokens for running ``step`` over ``batches``."""
    tokens, started = 0, time.perf_counter()
    for ids, labels in batches:
        step(ids, labels)
        tokens += ids.numel()
    return time.perf_counter() - started, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--chips", type=int, default=1, help="chips the chipspan model spans (all on the CPU)")
    args = parser.parse_args()

    folder = demo_model_dir()
    tokenizer = Tokenizer.from_folder(folder)
    with tempfile.TemporaryDirectory() as registry:
        shutil.copy(fetch_demo_datasets() / "alpaca_zh_demo.json", registry)
        entry = {"alpaca_zh_demo": {"file_name": "alpaca_zh_demo.json"}}
        (Path(registry) / "dataset_info.json").write_text(json.dumps(entry))
        examples = load_examples(
            "alpaca_zh_demo",
            registry,
            tokenizer,
            "default",
            cutoff_len=args.cutoff,
            max_samples=args.steps * args.rounds,
        )
    batches = [(torch.tensor([e.input_ids]), torch.tensor([e.labels])) for e in examples]
    loops = {"chipspan": chipspan_step_fn(folder, args.chips), "transformers+peft": reference_step_fn(folder)}
    totals = {name: [0.0, 0] for name in loops}
    for round_index in range(args.rounds):
        part = batches[round_index * args.steps : (round_index + 1) * args.steps]
        for name, step in loops.items():
            seconds, tokens = timed(step, part)
            totals[name][0] += seconds
            totals[name][1] += tokens
            print(f"round {round_index + 1} {name:>18}: {tokens / seconds:7.1f} tokens/s")
    speed = {name: tokens / seconds for name, (seconds, tokens) in totals.items()}
    print(
        f"chipspan / transformers+peft: {speed['chipspan'] / speed['transformers+peft']:.2f}x "
        f"({speed['chipspan']:.1f} vs {speed['transformers+peft']:.1f} tokens/s, {torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
