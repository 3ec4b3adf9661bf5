"""The memory savers in a run: a quantized base for LoRA (--quantization_bit), 8-bit AdamW
(--optim adamw_8bit), --pure_bf16 with stochastic rounding, and the host-offloaded AdamW
(--offload_optimizer) — trained, saved, resumed, and refused where they cannot go together."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import command, losses, one_process, run, torchrun, train_flags

from chipspan.adapters.lora import LoraLinear
from chipspan.adapters.peft_io import load_adapter
from chipspan.args import parse_run_arguments
from chipspan.errors import ChipspanError
from chipspan.models.weights import decoder_linears, load_pretrained
from chipspan.quant import QuantizedLinear, QuantSettings
from chipspan.train.checkpoints import read_optimizer_state
from chipspan.train.recipe import run_train


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_base_loads_as_quantized_linears_that_compute_its_weights(tiny_workspace, bits):
    """Every linear layer of the decoder layers is a QuantizedLinear holding no full-precision
    weight; embeddings, norms and head are the file's; the logits stay near the unquantized ones."""
    folder = tiny_workspace / "model"
    plain = load_pretrained(folder)
    quantized = load_pretrained(folder, quant=QuantSettings(bits, "nf4", True))
    names = decoder_linears(plain)
    assert len(names) == 7 * plain.config.num_hidden_layers
    for name in names:
        module = quantized.get_submodule(name)
        assert isinstance(module, QuantizedLinear) and not hasattr(module, "weight")
        exact = plain.get_submodule(name).weight
        error = (module.dequantize(torch.float32) - exact).abs().max() / exact.abs().max()
        assert error < (0.15 if bits == 4 else 0.01)
    assert torch.equal(quantized.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    ids = torch.randint(0, plain.config.vocab_size, (1, 16))
    with torch.no_grad():
        ours, exact = quantized(ids).logits, plain(ids).logits
    assert ((ours - exact).norm() / exact.norm()) < (0.2 if bits == 4 else 0.02)


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_a_quantized_base_trains_and_saves_an_adapter_for_the_unquantized_base(tiny_workspace, tmp_path, bits):
    """6 steps over two chips: the losses follow the full-precision base's (the first one within the
    quantization error), and the adapter has the keys of the full-precision run's and loads onto the
    unquantized model."""
    plain, quantized = tmp_path / "plain", tmp_path / "quantized"
    run(command(tiny_workspace, plain, "lora"))
    lines = []
    run(command(tiny_workspace, quantized, "lora") + ["--quantization_bit", str(bits)], report=lines.append)
    kind = "nf4 double-quant" if bits == 4 else "int8"
    assert any(line.startswith("frozen base: 28 linear weights") and kind in line for line in lines)
    assert losses(quantized) == pytest.approx(losses(plain), rel=0.01)
    assert losses(quantized) != losses(plain) or bits == 8  # 4-bit rounding shows in the loss
    saved = json.loads((quantized / "adapter_config.json").read_text())
    assert saved == json.loads((plain / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    ours, theirs = load_file(quantized / "adapter_model.safetensors"), load_file(plain / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    model = load_pretrained(tiny_workspace / "model")
    load_adapter(model, str(quantized))
    assert all(isinstance(m.weight, torch.nn.Parameter) for m in model.modules() if isinstance(m, LoraLinear))


def test_a_quantized_lora_layer_refuses_to_merge(tiny_workspace):
    model = load_pretrained(tiny_workspace / "model", quant=QuantSettings(4))
    from chipspan.adapters.lora import inject_lora, merge_lora

    inject_lora(model, "q_proj")
    with pytest.raises(ChipspanError, match="cannot be merged"):
        merge_lora(model)


@pytest.mark.multiprocess
def test_quantized_lora_under_torchrun_equals_one_process(tiny_workspace, tmp_path):
    single, staged = tmp_path / "single", tmp_path / "staged"
    argv = command(tiny_workspace, single, "lora") + ["--quantization_bit", "4"]
    run(argv)
    flags = command(tiny_workspace, staged, "lora")[1:] + ["--quantization_bit", "4"]
    flags = [f for f in flags if f not in ("--chips", "0-1")]
    torchrun("-m", "chipspan", "train", *flags)
    assert losses(staged) == pytest.approx(losses(single), rel=1e-4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--finetuning_type", "full", "--quantization_bit", "4"],
            "--quantization_bit 4 quantizes a frozen base, so it needs --finetuning_type lora, not full",
        ),
        (["--optim", "adamw_8bit", "--offload_optimizer"], "--offload_optimizer keeps AdamW's moments in host memory"),
        (["--quantization_bit", "3"], "--quantization_bit 3: must be a whole number 4 or 8"),
    ],
)
def test_savers_that_cannot_go_together_are_refused_before_loading(
    tiny_workspace, tmp_path, no_weight_loading, flags, message
):
    argv = [str(a) for a in train_flags(tiny_workspace, tmp_path / "out", *flags)]
    with pytest.raises(ChipspanError) as refused:
        run_train(parse_run_arguments(argv, {}), report=lambda _: None)
    assert message in str(refused.value)
    assert not (tmp_path / "out").exists()


# --- full fine-tuning: which AdamW, saved and resumed --------------------------------------------


@pytest.mark.parametrize(
    "flags, moment_dtype",
    [
        (["--optim", "adamw_8bit"], torch.uint8),
        (["--pure_bf16", "--device", "emu"], torch.bfloat16),  # stochastic rounding, on by default
        (["--offload_optimizer"], torch.float32),
    ],
)
def test_each_adamw_trains_saves_its_state_and_resumes_as_if_never_stopped(
    tiny_workspace, tmp_path, flags, moment_dtype
):
    out = tmp_path / "out"
    one_process(train_flags(tiny_workspace, out, *flags))
    straight = losses(out)
    assert straight[-1] < straight[0]
    state = read_optimizer_state(out / "checkpoint-2")["state"]
    embeddings = state["model.embed_tokens.weight"]
    assert embeddings["exp_avg"].dtype == moment_dtype
    if "--offload_optimizer" in flags:
        assert embeddings["master"].dtype == torch.float32
    one_process(train_flags(tiny_workspace, out, *flags, "--resume_from_checkpoint", out / "checkpoint-2"))
    assert losses(out) == straight


def test_the_offloaded_adamw_steps_as_torchs_adamw_on_the_chip(tiny_workspace, tmp_path):
    on_chip, offloaded = tmp_path / "chip", tmp_path / "host"
    one_process(train_flags(tiny_workspace, on_chip))
    one_process(train_flags(tiny_workspace, offloaded, "--offload_optimizer"))
    assert losses(offloaded) == pytest.approx(losses(on_chip), rel=1e-5)


def test_8bit_adamw_tracks_torchs_adamw(tiny_workspace, tmp_path):
    exact, eight = tmp_path / "exact", tmp_path / "eight"
    one_process(train_flags(tiny_workspace, exact))
    one_process(train_flags(tiny_workspace, eight, "--optim", "adamw_8bit"))
    assert losses(eight) == pytest.approx(losses(exact), rel=0.01)


def test_a_checkpoint_continues_only_with_the_optimizer_that_wrote_it(tiny_workspace, tmp_path):
    out = tmp_path / "out"
    one_process(train_flags(tiny_workspace, out, "--max_steps", "2"))
    again = train_flags(tiny_workspace, out, "--optim", "adamw_8bit", "--resume_from_checkpoint", out / "checkpoint-2")
    with pytest.raises(ChipspanError, match="trained with optim adamw_torch, this run asks for adamw_8bit"):
        one_process(again)


@pytest.mark.multiprocess
@pytest.mark.parametrize("flags", [["--optim", "adamw_8bit"], ["--offload_optimizer"]])
def test_8bit_and_host_states_resume_across_one_process_and_torchrun(tiny_workspace, tmp_path, flags):
    """A torchrun run's checkpoint (a state share per stage) continues in one process, and one
    process's under torchrun, to the losses of the run that never stopped."""
    single, staged, resumed = tmp_path / "single", tmp_path / "staged", tmp_path / "resumed"
    one_process(train_flags(tiny_workspace, single, *flags))
    straight = losses(single)
    torchrun("-m", "chipspan", "train", *train_flags(tiny_workspace, staged, *flags))
    assert losses(staged) == pytest.approx(straight, rel=1e-4)
    one_process(train_flags(tiny_workspace, staged, *flags, "--resume_from_checkpoint", staged / "checkpoint-2"))
    assert losses(staged) == pytest.approx(straight, rel=1e-4)
    shutil.copytree(single / "checkpoint-2", resumed / "checkpoint-2")
    torchrun("-m", "chipspan", "train", *train_flags(tiny_workspace, resumed, *flags))  # resumes the last checkpoint
    assert losses(resumed) == pytest.approx(straight[2:], rel=1e-4)
