"""HF weights IO: safetensors (single, sharded), .bin, and one-line errors for broken folders."""

import json
import shutil

import pytest
import torch
import transformers
from helpers import batch, make_reference
from safetensors.torch import load_file, save_file

from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig
from chipspan.models.weights import load_pretrained, model_state_dict, parse_size, save_weights


@pytest.fixture()
def reference(tmp_path):
    return make_reference(tmp_path / "ref", "smollm-tied")


def test_sharded_save_loads_back_in_chipspan_and_transformers(reference, tmp_path):
    ref, folder = reference
    model = load_pretrained(folder)
    out = tmp_path / "sharded"
    files = save_weights(model_state_dict(model), out, max_shard_size="40KB")
    shutil.copy(folder / "config.json", out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as HF does
    ids, _ = batch(ref.config.vocab_size)
    expected = ref(input_ids=ids).logits
    assert torch.equal(load_pretrained(out)(ids).logits, expected)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_a_save_replaces_the_weights_an_earlier_save_left(reference, tmp_path):
    _, folder = reference
    model = load_pretrained(folder)
    out = tmp_path / "again"
    save_weights({k: torch.zeros_like(v) for k, v in model_state_dict(model).items()}, out, max_shard_size="40KB")
    shutil.copy(folder / "config.json", out)
    save_weights(model_state_dict(model), out)  # one file now: the shards and their index must go
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    reloaded = load_pretrained(out).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in model.state_dict().items())


def test_loads_straight_into_the_requested_dtype(reference):
    _, folder = reference
    model = load_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_pytorch_bin_weights_load(reference, tmp_path):
    ref, folder = reference
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    shutil.copy(folder / "config.json", bin_folder)
    torch.save(load_file(folder / "model.safetensors"), bin_folder / "pytorch_model.bin")
    ids, _ = batch(ref.config.vocab_size)
    assert torch.equal(load_pretrained(bin_folder)(ids).logits, ref(input_ids=ids).logits)


def edit_weights(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_key_is_named(reference):
    _, folder = reference
    edit_weights(folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ChipspanError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(folder)


def test_unexpected_key_is_named(reference):
    _, folder = reference
    edit_weights(folder, lambda s: s.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(ChipspanError, match=r"unexpected keys: model\.layers\.9\.mlp\.up_proj\.weight"):
        load_pretrained(folder)


def test_shape_mismatch_is_named(reference):
    _, folder = reference
    edit_weights(folder, lambda s: s.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(ChipspanError, match=r"shape mismatch: model\.norm\.weight \(3,\) vs \(64,\)"):
        load_pretrained(folder)


def test_truncated_safetensors_file(reference):
    _, folder = reference
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ChipspanError, match="truncated"):
        load_pretrained(folder)


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(ChipspanError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 8,
                "hidden_size": 8,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
        )
    )
    with pytest.raises(ChipspanError, match="no model weights"):
        load_pretrained(tmp_path)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ChipspanError, match="no 'model_type'; add one of: llama, mistral, qwen2"):
        ModelConfig.from_dict({"hidden_size": 8})
    with pytest.raises(ChipspanError, match="'gpt2' .* not supported; chipspan supports: llama, mistral, qwen2"):
        ModelConfig.from_dict({"model_type": "gpt2"})
    with pytest.raises(ChipspanError, match='rope_scaling type "yarn" in config.json is not supported'):
        ModelConfig.from_dict(
            {
                "model_type": "llama",
                "vocab_size": 8,
                "hidden_size": 8,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
            }
        )


def test_parameter_count_matches_the_built_model(reference):
    ref, folder = reference
    model = load_pretrained(folder)
    assert model.config.num_parameters == sum(p.numel() for p in model.parameters()) == ref.num_parameters()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(123) == 123
    with pytest.raises(ChipspanError, match="cannot read size"):
        parse_size("five")
