"""chipspan on Sophgo chips, rehearsed. tests/plugins/torch_tpu stands in for Sophgo's torch-tpu
plugin: it registers emulated chips as device ``tpu`` that refuse int64 (and the quantized dtypes)
as a BM1684X does, so ``USE_SOPHGO=1 SOPHGO_SPLIT=N CHIPS=K chipspan train`` runs as on the card,
and any int64 tensor put on a chip fails the run. A process has one PrivateUse1 device, and this
one's is ``emu``: each Sophgo run is a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, command, emu_chips, lf05_command, log_lines, losses, one_process, run, torchrun, train_flags
from test_train import LF05_JOBS

from chipspan.distributed import mesh
from chipspan.train.reporting import PREDICTIONS_FILE

pytestmark = pytest.mark.multiprocess
PLUGINS = REPO / "tests" / "plugins"
SOPHGO = {"USE_SOPHGO": "1", "PYTHONPATH": f"{PLUGINS}{os.pathsep}{REPO}", "CHIPSPAN_EMU_CHIPS": "24"}


@pytest.fixture(scope="module", autouse=True)
def chips():
    with emu_chips(21):
        yield


def without(argv, *flags):
    """``argv`` less each of ``flags`` and the value after it."""
    argv = [str(a) for a in argv]
    for flag in flags:
        at = argv.index(flag)
        del argv[at : at + 2]
    return argv


def on_sophgo(argv, split, first=0, timeout=300):
    """``chipspan argv`` (train, env) in its own process on the stand-in plugin's chips
    first..first+split-1, as ``USE_SOPHGO=1 SOPHGO_SPLIT=split CHIPS=first``; its printed output."""
    env = {**os.environ, **SOPHGO, "SOPHGO_SPLIT": str(split), "CHIPS": str(first), "OMP_NUM_THREADS": "1"}
    argv = [str(a) for a in argv]
    done = subprocess.run(
        [sys.executable, "-m", "chipspan", *argv], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def plugin_says(code):
    """What ``code`` prints in a process that imported the stand-in plugin, after the plugin's own line."""
    env = {**os.environ, **SOPHGO, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    chatter, _, said = done.stdout.strip().partition("\n")
    assert chatter == "Arch bm1684x selected because libtpudnn.bm1684x.so works"
    return said


@pytest.mark.slow
@pytest.mark.parametrize("job,chips", LF05_JOBS, ids=["7b-lora-2", "13b-lora-4", "7b-full-11", "13b-full-21"])
def test_the_seeds_four_command_lines_run_on_sophgo_chips(lf05_workspace, tmp_path, job, chips):
    """As the seed ran them (--fp16 included), two steps each: on the plugin's chips they place
    the layers as on emulated chips and train to the same losses, bit for bit."""
    first = 24 - chips  # the last chips of the machine: CHIPS=K counts from K
    sophgo, emulated = tmp_path / "sophgo", tmp_path / "emu"
    steps = ["--max_steps", "2", "--save_steps", "1"]
    printed = on_sophgo(["train", *lf05_command(job, lf05_workspace, sophgo, *steps)], chips, first)
    assert f"placement over {chips} chip(s)" in printed
    assert f"chip {chips - 1} (tpu:{first + chips - 1})" in printed
    run(["train", *lf05_command(job, lf05_workspace, emulated, *steps, "--device", "emu", "--chips", f"0-{chips - 1}")])
    assert losses(sophgo) == losses(emulated) and len(losses(sophgo)) == 2
    assert (sophgo / "checkpoint-2" / "scaler.pt").is_file()  # --fp16 ran with a loss scale


@pytest.mark.slow
@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_evaluation_prediction_and_resume_on_sophgo_chips_equal_the_cpu(tiny_workspace, tmp_path, finetuning):
    sophgo, cpu = tmp_path / "sophgo", tmp_path / "cpu"
    flags = ["--do_predict", "--val_size", "4", "--eval_strategy", "steps", "--eval_steps", "2"]
    flags += ["--max_new_tokens", "4", "--save_steps", "2"]
    if finetuning == "lora":
        flags += ["--quantization_bit", "4", "--packing", "true"]
    on_sophgo(without(command(tiny_workspace, sophgo, finetuning), "--device", "--chips") + flags, 2)
    run(command(tiny_workspace, cpu, finetuning) + flags)
    assert losses(sophgo) == losses(cpu)
    evaluated = [[line["eval_loss"] for line in log_lines(out) if "eval_loss" in line] for out in (sophgo, cpu)]
    assert evaluated[0] == evaluated[1] and evaluated[0]
    assert (sophgo / PREDICTIONS_FILE).read_text() == (cpu / PREDICTIONS_FILE).read_text()

    resumed = without(command(tiny_workspace, sophgo, finetuning), "--device", "--chips") + flags
    on_sophgo(resumed + ["--resume_from_checkpoint", sophgo / "checkpoint-2"], 2)
    assert losses(sophgo) == losses(cpu)


def test_the_fp16_loss_scale_is_saved_in_the_plugins_grad_scaler_format(tiny_workspace, tmp_path):
    out = tmp_path / "out"
    job = without(command(tiny_workspace, out, "lora"), "--device", "--chips", "--max_steps", "--save_steps")
    on_sophgo(job + ["--fp16", "--max_steps", "2", "--save_steps", "2"], 2)
    scaler = out / "checkpoint-2" / "scaler.pt"
    restored = plugin_says(
        "import torch, torch_tpu\n"
        "scaler = torch_tpu.tpu.amp.GradScaler()\n"
        f"scaler.load_state_dict(torch.load({str(scaler)!r}, weights_only=True)['scaler'])\n"
        "print(scaler.get_scale(), scaler.state_dict()['_growth_tracker'])"
    )
    assert restored == "65536.0 2"  # two clean steps at the initial scale, as torch's GradScaler counts them


def test_the_stand_in_plugin_refuses_int64_on_a_chip_as_the_plugin_does():
    said = plugin_says(
        "import torch, torch_tpu\n"
        "try:\n"
        "    torch.arange(3, device='tpu:0')\n"
        "except TypeError as e:\n"
        "    print(e)\n"
        "print(torch.tpu.device_count(), torch.tpu.mem_get_info(0)[1] >> 30, torch.arange(3, dtype=torch.int32, device='tpu:1').device)"
    )
    assert said.splitlines() == [
        "tpu:0 (bm1684x) does not support dtype Long: keep such tensors on the host or use a narrower dtype",
        "24 14 tpu:1",
    ]


@pytest.mark.slow
def test_stages_and_replicas_on_sophgo_chips_train_as_one_process(tiny_workspace, tmp_path):
    """Under torchrun the plugin registers no collective library for a BM1684X (nor does emu):
    chipspan's host-staged gloo carries the stages' activations and the replicas' gradients."""
    single, staged = tmp_path / "single", tmp_path / "staged"
    one_process(train_flags(tiny_workspace, single))
    torchrun("-m", "chipspan", "train", *train_flags(tiny_workspace, staged, "--micro_batches", "2"), env=SOPHGO)
    assert losses(staged) == losses(single)

    # fp16 data-parallel LoRA: on plain emulated chips DDP starts as usual, on the plugin's through the host
    replicas = {"sophgo": SOPHGO, "emu": {"CHIPSPAN_EMU_CHIPS": "2"}}
    for name, env in replicas.items():
        lora = without(command(tiny_workspace, tmp_path / name, "lora"), "--device", "--chips", "--max_steps")
        lora += ["--device", "emu"] if name == "emu" else []
        torchrun("-m", "chipspan", *lora, "--fp16", "--data_parallel", "2", "--max_steps", "3", env=env)
    assert losses(tmp_path / "sophgo") == losses(tmp_path / "emu")


def test_a_vendors_collective_library_is_preferred_to_host_staging(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setitem(dist.Backend.default_device_backend_map, "tpu", "sccl")
    assert mesh.backend_for("tpu") == "cpu:gloo,tpu:sccl"  # gloo for what the chips' library lacks: host tensors
    assert mesh.backend_for("cuda") == "nccl"


def test_chipspan_env_lists_the_sophgo_chips_and_their_memory():
    printed = on_sophgo(["env"], 2).splitlines()
    assert "device tpu: 24 chip(s)" in printed and "  tpu:23: 14.00 GiB free of 14.00 GiB" in printed
    assert f"plugin: {PLUGINS / 'torch_tpu' / '__init__.py'}" in printed
    assert {"USE_SOPHGO=1", "SOPHGO_SPLIT=2", "CHIPS=0"} <= set(printed)
    report = json.loads(on_sophgo(["env", "--json"], 2))  # the plugin's chatter on import stays out of it
    assert report["device_type"] == "tpu" and report["chips"][23] == {
        "device": "tpu:23",
        "free_bytes": 14 << 30,
        "total_bytes": 14 << 30,
    }
