"""Peak host memory of `chipspan export` against the model's size, side by side in one run.

A random Llama of about 0.8 GB (fp32; --layers and --hidden change it) with a LoRA adapter on every
projection is exported four ways, each in its own process: importing chipspan and reading the
config only (the baseline), loading the whole model (what a merge that holds the model needs),
`chipspan export` with shards of --shard_size, and `chipspan export` to one GGUF file (q8_0). Each line is the process's peak RSS above the
baseline, as a ratio of the model's bytes.

    python bench/export_memory.py [--layers 16] [--hidden 1024] [--shard_size 200MB]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from chipspan.adapters.lora import inject_lora
from chipspan.adapters.peft_io import save_adapter
from chipspan.models.config import ModelConfig
from chipspan.models.decoder import CausalLM
from chipspan.models.weights import save_weights

STEPS = {
    "baseline": "from chipspan.models.config import ModelConfig; ModelConfig.from_folder({base!r})",
    "whole model": (  # every weight written once, as a merge does (read alone, mapped pages stay on disk)
        "import torch; from chipspan.models.weights import load_pretrained; m = load_pretrained({base!r})\n"
        "with torch.no_grad(): [p.add_(0) for p in m.parameters()]"
    ),
    "chipspan export": (
        "from chipspan.cli import main; main(['export', '--model_name_or_path', {base!r}, "
        "'--adapter_name_or_path', {adapter!r}, '--export_dir', {out!r}, '--export_size', {shard!r}])"
    ),
    "export to GGUF q8_0": (
        "from chipspan.cli import main; main(['export', '--model_name_or_path', {base!r}, "
        "'--adapter_name_or_path', {adapter!r}, '--export_dir', {out!r} + '-gguf', '--export_format', 'gguf', "
        "'--export_quantization', 'q8_0'])"
    ),
}


def make_model(folder: Path, layers: int, hidden: int) -> tuple[Path, Path, int]:
    """A random model and adapter in ``folder``; returns (model folder, adapter folder, model bytes)."""
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
        "hidden_size": hidden, "intermediate_size": hidden * 11 // 4, "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "float32",
    }  # fmt: skip
    base = folder / "model"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config))
    model = CausalLM(ModelConfig.from_folder(base))
    save_weights(model.state_dict(), base)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    inject_lora(model, "all", r=8, alpha=16)
    adapter = folder / "adapter"
    save_adapter(model, adapter, str(base))
    return base, adapter, size


def peak_rss(code: str) -> int:
    """Peak resident bytes of a fresh Python process running ``code``."""
    # VmHWM, not ru_maxrss: the latter keeps the peak of the process that started this one
    probe = f"{code}\nprint([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) * 1024  # kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--shard_size", default="200MB")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter, size = make_model(Path(tmp), args.layers, args.hidden)
        values = dict(base=str(base), adapter=str(adapter), out=str(Path(tmp) / "out"), shard=args.shard_size)
        peaks = {name: peak_rss(code.format(**values)) for name, code in STEPS.items()}
        print(f"model: {size / 1e9:.2f} GB fp32, {args.layers} layers; shards of {args.shard_size}")
        for name in ("whole model", "chipspan export", "export to GGUF q8_0"):
            extra = peaks[name] - peaks["baseline"]
            print(f"  {name:<20} peak above baseline {extra / 1e9:5.2f} GB = {extra / size:.2f} x the model")


if __name__ == "__main__":
    main()
