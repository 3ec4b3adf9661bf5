"""Training on chips that cannot hold int64 (Sophgo's BM1684X under torch-tpu), rehearsed on
emulated chips with the ``bm1684x`` profile, which refuses every int64 tensor on a chip: token ids,
positions and the loss's, the 4-bit base's and 8-bit AdamW's indices travel as int32, generation
picks its tokens on the host, and every run equals the CPU's."""

from __future__ import annotations

import pytest
from helpers import command, emu_chips, log_lines, losses, one_process, run, train_flags

from chipspan import emu
from chipspan.train.reporting import PREDICTIONS_FILE


@pytest.fixture(scope="module", autouse=True)
def chips():
    with emu_chips(2):
        yield


@pytest.fixture()
def bm1684x(monkeypatch):
    """The emulated chips `train` starts are BM1684X-like (int64 refused) for this test only."""
    monkeypatch.setenv("CHIPSPAN_EMU_PROFILE", "bm1684x")
    yield
    emu.enable(num_chips=2)  # plain again for the tests after


def _on_emu(argv):
    argv = [str(a) for a in argv]
    argv[argv.index("--device") + 1] = "emu"
    return argv


def test_full_fine_tuning_with_8_bit_adamw_and_evaluation_equals_the_cpu(tiny_workspace, tmp_path, bm1684x):
    cpu, chips = tmp_path / "cpu", tmp_path / "chips"
    flags = [
        "--chips",
        "0-1",
        "--device",
        "cpu",
        "--optim",
        "adamw_8bit",
        "--val_size",
        "4",
        "--eval_strategy",
        "steps",
    ]
    one_process(train_flags(tiny_workspace, cpu, *flags))
    one_process(_on_emu(train_flags(tiny_workspace, chips, *flags)))
    assert emu.profile().name == "bm1684x"
    assert losses(chips) == losses(cpu)
    evaluated = [[line["eval_loss"] for line in log_lines(out) if "eval_loss" in line] for out in (chips, cpu)]
    assert evaluated[0] == evaluated[1] and evaluated[0]


def test_packed_lora_on_a_4_bit_base_and_its_predictions_equal_the_cpu(tiny_workspace, tmp_path, bm1684x):
    cpu, chips = tmp_path / "cpu", tmp_path / "chips"
    flags = ["--quantization_bit", "4", "--packing", "true", "--do_predict", "--val_size", "2", "--max_new_tokens", "4"]
    run(command(tiny_workspace, cpu, "lora") + flags)
    run(_on_emu(command(tiny_workspace, chips, "lora") + flags))
    assert emu.profile().name == "bm1684x"
    assert losses(chips) == losses(cpu)
    assert (chips / PREDICTIONS_FILE).read_text() == (cpu / PREDICTIONS_FILE).read_text()
