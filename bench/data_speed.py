"""Encoding speed: chipspan's data pipeline against LLaMA-Factory 0.9.5's, side by side in one run.

    python bench/data_speed.py [--copies 20] [--rounds 2] [--threads 1] [--lf-venv DIR]

The same rows (``alpaca_zh_demo`` from ../shared/data repeated ``--copies`` times, one JSON file),
the same tokenizer (../shared/assets/llama2-tokenizer), template ``default``, cutoff 1024, SFT, one
process. Three timings per round, taken in turn so that machine noise hits all alike:

- LLaMA-Factory: ``llamafactory.data.get_dataset`` (read, align, tokenize, ``overwrite_cache``), run
  with the venv that ../shared/peers/setup_llamafactory.sh builds (HF_HUB_OFFLINE=1, its stubs on
  PYTHONPATH), timed inside that process around the call;
- chipspan cold: ``load_dataset_split`` with ``overwrite_cache`` (read, convert, encode, count
  truncations, write the cache);
- chipspan warm: the same call again, served from the cache.

Tokenizer loading and imports are outside every timing. Threads are pinned alike on both sides:
OMP_NUM_THREADS, RAYON_NUM_THREADS and RAYON_RS_NUM_CPUS (the tokenizers library's Rust pool) are
set to ``--threads`` for this process and the LLaMA-Factory one. Note that the two ``default``
templates differ (LLaMA-Factory 0.5's and 0.9.5's), by a few template tokens per row.
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

SHARED = Path(__file__).resolve().parents[2] / "shared"
ROWS = SHARED / "data" / "alpaca_zh_demo.json"
TOKENIZER = SHARED / "assets" / "llama2-tokenizer"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS")

LF_SCRIPT = """
import json, sys, tempfile, time
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer
model_args, data_args, training_args, _, _ = get_train_args(dict(
    stage="sft", do_train=True, model_name_or_path=sys.argv[1], dataset="bench", dataset_dir=sys.argv[2],
    template="default", cutoff_len=1024, overwrite_cache=True, output_dir=tempfile.mkdtemp(),
    finetuning_type="lora", lora_target="q_proj", report_to="none"))
tokenizer_module = load_tokenizer(model_args)
template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
started = time.perf_counter()
dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
print(json.dumps({"rows": len(dataset["train_dataset"]), "seconds": time.perf_counter() - started}))
"""


def make_dataset(folder: Path, copies: int) -> int:
    """``folder``/bench.json (the demo rows ``copies`` times) and its dataset_info.json; returns the rows."""
    rows = json.loads(ROWS.read_text(encoding="utf-8")) * copies
    (folder / "bench.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.json"}}))
    return len(rows)


def time_llamafactory(venv: Path, folder: Path) -> tuple[int, float]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(venv / "stubs"),
        "HF_DATASETS_CACHE": str(folder / "hf-datasets"),
        "TOKENIZERS_PARALLELISM": "true",
    }
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", LF_SCRIPT, str(TOKENIZER), str(folder)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"LLaMA-Factory failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["rows"], result["seconds"]


def time_chipspan(folder: Path, overwrite_cache: bool) -> tuple[int, float, bool]:
    from chipspan.args import DataArguments
    from chipspan.data.loader import load_dataset_split
    from chipspan.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(TOKENIZER)
    data = DataArguments(
        dataset="bench", dataset_dir=str(folder), template="default", cutoff_len=1024, overwrite_cache=overwrite_cache
    )
    started = time.perf_counter()
    split = load_dataset_split(data, tokenizer, "sft")
    return len(split.train), time.perf_counter() - started, split.stats.from_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=20, help="times the 1,000 demo rows are repeated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OpenMP and Rust threads, both sides")
    parser.add_argument("--lf-venv", type=Path, default=Path.home() / ".cache" / "llamafactory-venv")
    args = parser.parse_args()
    for name in THREAD_VARIABLES:  # before tokenizers is imported: its Rust pool reads them once
        os.environ[name] = str(args.threads)
    if not (args.lf_venv / "bin" / "llamafactory-cli").exists():
        sys.exit(f"no LLaMA-Factory venv at {args.lf_venv}: run ../shared/peers/setup_llamafactory.sh")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["CHIPSPAN_CACHE"] = str(folder / "chipspan-cache")
        rows = make_dataset(folder, args.copies)
        print(
            f"{rows:,} rows ({args.copies} x alpaca_zh_demo), llama2 tokenizer, template default, cutoff 1024, "
            f"{args.threads} thread(s) each side ({', '.join(THREAD_VARIABLES)})"
        )
        totals = {"lf": 0.0, "cold": 0.0}
        warm_times = []
        for round_ in range(1, args.rounds + 1):
            lf_rows, lf_seconds = time_llamafactory(args.lf_venv, folder)
            cs_rows, cold_seconds, _ = time_chipspan(folder, overwrite_cache=True)
            _, warm_seconds, hit = time_chipspan(folder, overwrite_cache=False)
            assert hit and lf_rows == cs_rows == rows, (lf_rows, cs_rows, rows, hit)
            totals["lf"] += lf_seconds
            totals["cold"] += cold_seconds
            warm_times.append(warm_seconds)
            print(
                f"round {round_}: LLaMA-Factory {rows / lf_seconds:8,.0f} rows/s ({lf_seconds:.2f} s) | "
                f"chipspan cold {rows / cold_seconds:8,.0f} rows/s ({cold_seconds:.2f} s) | "
                f"chipspan warm {warm_seconds:.3f} s"
            )
        print(
            f"chipspan cold / LLaMA-Factory: {totals['lf'] / totals['cold']:.2f}x the rows/s; "
            f"warm re-run {max(warm_times):.3f} s at worst"
        )


if __name__ == "__main__":
    main()
