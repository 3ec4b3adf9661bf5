"""lora, full and freeze each train exactly what they should, and what they save loads back."""

import pytest
import torch
import transformers
from helpers import command, run
from peft import PeftModel
from safetensors.torch import load_file

H, INTERMEDIATE, LAYERS = 32, 64, 4  # the tiny_workspace model: hidden, intermediate size, decoder layers
MLP, ATTENTION = 3 * H * INTERMEDIATE, 4 * H * H  # parameters of one layer's mlp and self_attn (no biases)


def trainable_count(messages):
    line = next(m for m in messages if m.startswith("trainable params:"))
    return int(line.split()[2].replace(",", ""))


@pytest.mark.parametrize(
    "layers, modules, trained_layers, trained_parts, expected",
    [
        ("2", "mlp", {2, 3}, ("mlp.",), 2 * MLP),
        ("-1", "self_attn", {0}, ("self_attn.",), ATTENTION),
        ("1", "all", {3}, ("mlp.", "self_attn."), MLP + ATTENTION),
    ],
)
def test_freeze_trains_only_the_chosen_modules_of_the_chosen_layers(
    tiny_workspace, tmp_path, layers, modules, trained_layers, trained_parts, expected
):
    out, messages = tmp_path / "freeze", []
    run(
        command(tiny_workspace, out, "freeze") + ["--num_layer_trainable", layers, "--name_module_trainable", modules],
        report=messages.append,
    )
    assert trainable_count(messages) == expected

    before, after = load_file(tiny_workspace / "model" / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name].to(before[name].dtype))}
    should_change = {
        name for name in before if any(f"layers.{i}.{part}" in name for i in trained_layers for part in trained_parts)
    }
    assert changed == should_change
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(
        reloaded.state_dict()["model.layers.3.mlp.up_proj.weight"], after["model.layers.3.mlp.up_proj.weight"]
    )


def test_full_trains_every_parameter_and_saves_a_loadable_model(tiny_workspace, tmp_path):
    out, messages = tmp_path / "full", []
    run(command(tiny_workspace, out, "full"), report=messages.append)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_workspace / "model")
    assert trainable_count(messages) == sum(p.numel() for p in reference.parameters())
    trained = transformers.AutoModelForCausalLM.from_pretrained(out)
    before, after = reference.state_dict(), trained.state_dict()
    assert all(not torch.equal(before[name], after[name]) for name in before)


def test_lora_trains_only_the_adapters_and_peft_loads_them(tiny_workspace, tmp_path):
    out, messages = tmp_path / "lora", []
    run(command(tiny_workspace, out, "lora"), report=messages.append)
    assert trainable_count(messages) == LAYERS * 2 * 8 * (H + H)  # q_proj and v_proj, rank 8
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_workspace / "model")
    tuned = PeftModel.from_pretrained(base, out)
    ids = torch.tensor([[1, 450, 4996, 17354]])
    with torch.no_grad():
        adapted_logits = tuned(ids).logits
        with tuned.disable_adapter():
            plain_logits = tuned(ids).logits
    assert not torch.allclose(adapted_logits, plain_logits)  # the trained adapters came back
