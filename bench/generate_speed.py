"""Greedy generation speed: chipspan's engine (what `chat` and `api` run) against transformers'
``generate``, side by side in one run.

    python bench/generate_speed.py [--tokens 128] [--rounds 3] [--chips 1]

The same SmolLM2-135M-Instruct (fetched and converted as the demo does), the same prompt (its own
chat template), greedy, a KV cache in both, fp32 on the CPU. The two take turns, ``--rounds`` times,
so machine noise hits both alike; it prints tokens/s for each round and the ratio of the totals.
Both are held to exactly ``--tokens`` new tokens (no stop id) and are checked to produce the same
ids. Needs transformers (the test extras).
"""

from __future__ import annotations

import argparse
import time

import torch

from chipspan.args import parse_run_arguments
from chipspan.assets import demo_model_dir
from chipspan.infer.engine import Engine
from chipspan.infer.generate import generate

QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chips", type=int, default=1, help="CPU chips chipspan spans the model over")
    args = parser.parse_args()

    import transformers

    folder = demo_model_dir()
    flags = ["--model_name_or_path", str(folder), "--do_sample", "false", "--chips", f"0-{args.chips - 1}"]
    engine = Engine.load(parse_run_arguments(flags, {}, command="chat"), torch.float32, report=lambda _: None)
    prompt = engine.prompt_ids([("user", QUESTION)])
    settings = engine.with_settings(max_new_tokens=args.tokens)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt_tensor = torch.tensor([prompt])

    def ours() -> list[int]:
        return generate(engine.decoder, prompt, (), settings)

    def theirs() -> list[int]:
        with torch.no_grad():
            out = reference.generate(
                prompt_tensor, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=0
            )
        return out[0, len(prompt) :].tolist()

    print(f"SmolLM2-135M, prompt {len(prompt)} tokens, {args.tokens} new, greedy, {torch.get_num_threads()} threads")
    totals = {"chipspan": 0.0, "transformers": 0.0}
    for round_ in range(args.rounds):
        times = {}
        for name, run in (("chipspan", ours), ("transformers", theirs)):
            started = time.perf_counter()
            ids = run()
            times[name] = time.perf_counter() - started
            assert len(ids) == args.tokens, f"{name} made {len(ids)} tokens"
            if name == "chipspan":
                first = ids
            elif ids != first:
                raise SystemExit(f"round {round_ + 1}: the two generated different ids")
            totals[name] += times[name]
        print(
            f"round {round_ + 1}: chipspan {args.tokens / times['chipspan']:.1f} tok/s, "
            f"transformers {args.tokens / times['transformers']:.1f} tok/s"
        )
    print(f"chipspan / transformers tokens/s: {totals['transformers'] / totals['chipspan']:.2f}")


if __name__ == "__main__":
    main()
