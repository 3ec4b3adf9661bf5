"""A run killed with SIGKILL (mid-step, mid-save) and started again continues exactly where it was.

The killed runs are subprocesses that kill themselves at a chosen moment; the resumed run is the
same command again (LLaMA-Factory 0.5's automatic resume). On the CPU with one thread, the resumed run must
give the uninterrupted run's losses at every step and the same final weights, bit for bit.
"""

import json
import signal
import subprocess
import sys

import pytest
from helpers import command, run
from safetensors.torch import load_file

# Runs chipspan's CLI after arranging to SIGKILL this process at one moment, named by argv[1]:
#   step:N  inside the N-th batch's forward pass (mid-step)
#   save:N  while checkpoint-N is being written, after its optimizer state
KILLER = """
import os, signal, sys
import torch
from chipspan.cli import main
from chipspan.chips import runner

torch.set_num_threads(1)
kind, at = sys.argv[1].split(":")
at = int(at)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if kind == "step":
    forward, calls = runner.pipelined_loss, [0]
    def counting_forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            die()
        return forward(*args, **kwargs)
    runner.pipelined_loss = counting_forward
else:
    save = torch.save
    def dying_save(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        if str(f).endswith(f".checkpoint-{at}.tmp/optimizer.pt"):
            die()
    torch.save = dying_save
sys.exit(main(sys.argv[2:]))
"""


def losses(out):
    lines = (out / "trainer_log.jsonl").read_text().splitlines()
    return [(entry["current_steps"], entry["loss"]) for entry in map(json.loads, lines)]


def final_weights(out, finetuning_type):
    return load_file(out / ("adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"))


@pytest.mark.multiprocess
@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
@pytest.mark.parametrize("moment", ["step:5", "save:4"])
def test_a_killed_run_resumes_to_the_same_losses_and_weights(tiny_workspace, tmp_path, finetuning_type, moment):
    straight = tmp_path / "straight"
    run(command(tiny_workspace, straight, finetuning_type))

    out = tmp_path / "killed"
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, moment, *command(tiny_workspace, out, finetuning_type)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    complete = sorted(p.name for p in out.glob("checkpoint-*"))
    assert complete == (["checkpoint-2", "checkpoint-4"] if moment == "step:5" else ["checkpoint-2"])
    if moment == "save:4":
        assert (out / ".checkpoint-4.tmp").is_dir()  # half written, never picked

    run(command(tiny_workspace, out, finetuning_type))
    assert not list(out.glob(".checkpoint-*"))
    assert losses(out) == losses(straight)
    expected, resumed = final_weights(straight, finetuning_type), final_weights(out, finetuning_type)
    assert expected.keys() == resumed.keys()
    assert all(resumed[name].equal(expected[name]) for name in expected)
