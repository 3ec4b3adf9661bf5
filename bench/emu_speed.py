"""How much slower is emu than the CPU? ``python bench/emu_speed.py``

Times one training step (forward, backward) of a two-layer MLP on the CPU and the same
MLP split over emu:0 and emu:1, alternating the two so machine noise hits both alike, and
prints the median times and their ratio, for large matmuls and for many small ops.
"""

import argparse
import statistics
import time

import torch
from torch import nn

import chipspan.emu as emu


def stages(width: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(width, 4 * width), nn.GELU()), nn.Linear(4 * width, width)]


def step(model: list[nn.Module], devices: list[str], x: torch.Tensor) -> float:
    start = time.perf_counter()
    h = x
    for stage, device in zip(model, devices):
        h = stage(h.to(device))
    h.pow(2).mean().backward()
    for stage in model:
        stage.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def compare(width: int, batch: int, repeats: int) -> tuple[float, float]:
    cpu = stages(width)
    chips = ["emu:0", "emu:1"]
    on_chips = [stage.to(chip) for stage, chip in zip(stages(width), chips)]
    x = torch.randn(batch, width)
    cpu_times, emu_times = [], []
    for _ in range(repeats + 1):  # the first round warms up
        cpu_times.append(step(cpu, ["cpu", "cpu"], x))
        emu_times.append(step(on_chips, chips, x))
    return statistics.median(cpu_times[1:]), statistics.median(emu_times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    emu.enable(num_chips=2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} steps")
    for label, width, batch in [("large matmuls", 1024, 64), ("small ops", 64, 8)]:
        cpu, on_emu = compare(width, batch, args.repeats)
        print(
            f"{label:14} width {width:5} batch {batch:3}: cpu {cpu * 1e3:8.2f} ms  "
            f"emu {on_emu * 1e3:8.2f} ms  emu/cpu {on_emu / cpu:5.1f}x"
        )


if __name__ == "__main__":
    main()
