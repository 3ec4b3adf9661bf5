"""LoRA against PEFT on random tiny models: adapters cross over both ways with the same logits and gradients."""

import json
import warnings

import peft
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chipspan.adapters.lora import LoraLinear, inject_lora, merge_and_unload, merge_lora, unmerge_lora
from chipspan.adapters.peft_io import adapter_parameters, adapter_state_dict, check_adapter, load_adapter, save_adapter
from chipspan.args import FinetuningArguments
from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig
from chipspan.models.weights import load_pretrained
from chipspan.train.finetune import check_finetuning_arguments

TINY = dict(
    vocab_size=131,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Random tiny Llama folders: 'untied' (with q/k/v/o biases) and 'tied' (SmolLM-style)."""
    folders = {}
    for name, extra in (("untied", dict(attention_bias=True)), ("tied", dict(tie_word_embeddings=True))):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY, **extra))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "norm" in param_name or param_name.endswith("bias"):
                    param.add_(torch.randn_like(param) * 0.1)
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name])
    return folders


def batch(b=2, s=12, seed=1):
    ids = torch.randint(0, TINY["vocab_size"], (b, s), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


def perturb_trainable(model, seed=2):
    """Make every trainable tensor count (LoRA B starts at zero): add noise to it."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def peft_key(name):
    """PEFT's parameter name -> its saved key: without the adapter name and the modules_to_save wrapper."""
    return name.replace(".default", "").replace(".modules_to_save", "")


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "base, target, options",
    [
        ("untied", "q_proj,v_proj", {}),
        ("untied", "all", dict(use_rslora=True, alpha=4, r=4)),
        ("untied", "q_proj,v_proj", dict(additional_target="embed_tokens,lm_head,norm")),
        ("tied", "k_proj,down_proj", dict(additional_target="embed_tokens")),
    ],
)
def test_chipspan_adapter_loads_in_peft_with_same_logits(bases, tmp_path, base, target, options):
    ours = load_pretrained(bases[base])
    inject_lora(ours, target, **options)
    perturb_trainable(ours)
    save_adapter(ours, tmp_path, bases[base])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(reference(bases[base]), tmp_path).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    ids, _ = batch()
    assert max_diff(ours(ids).logits, theirs(input_ids=ids).logits) < 1e-5


@pytest.mark.parametrize(
    "base, config",
    [
        ("untied", dict(target_modules=["q_proj", "v_proj"])),
        ("untied", dict(target_modules=r".*\.(gate|up)_proj", modules_to_save=["lm_head", "norm"], use_rslora=True)),
        ("tied", dict(target_modules=["o_proj"], modules_to_save=["embed_tokens"])),  # PEFT unties
        ("tied", dict(target_modules=["o_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True)),
    ],
)
def test_peft_adapter_loads_into_chipspan_with_same_logits(bases, tmp_path, base, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's advice on tied weights
        theirs = peft.get_peft_model(reference(bases[base]), peft.LoraConfig(r=4, lora_alpha=8, **config))
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_pretrained(bases[base])
    load_adapter(ours, tmp_path)
    ids, _ = batch()
    assert max_diff(ours(ids).logits, theirs.eval()(input_ids=ids).logits) < 1e-5


def test_all_targets_exactly_the_seven_projection_kinds(bases, tmp_path):
    ours = load_pretrained(bases["untied"])
    wrapped = inject_lora(ours, "all")
    assert len(wrapped) == len(PROJECTIONS) * TINY["num_hidden_layers"]
    assert {name.rpartition(".")[2] for name in wrapped} == PROJECTIONS
    assert not isinstance(ours.lm_head, LoraLinear)
    save_adapter(ours, tmp_path, None)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == sorted(PROJECTIONS)


def test_merge_unmerge_and_export_keep_the_logits(bases):
    ours = load_pretrained(bases["untied"])
    base_state = {k: v.clone() for k, v in ours.state_dict().items()}
    inject_lora(ours, "all", additional_target="norm")
    perturb_trainable(ours)
    ids, _ = batch()
    with torch.no_grad():
        unmerged = ours(ids).logits
        merge_lora(ours)
        assert max_diff(ours(ids).logits, unmerged) < 1e-5
        with pytest.raises(ChipspanError, match="already merged"):
            merge_lora(ours)
        unmerge_lora(ours)
        for name, layer in ours.named_modules():
            if isinstance(layer, LoraLinear):
                assert max_diff(layer.weight, base_state[f"{name}.weight"]) < 1e-6
        merge_and_unload(ours)
        assert max_diff(ours(ids).logits, unmerged) < 1e-5
    assert not any(isinstance(m, LoraLinear) for m in ours.modules())
    assert set(ours.state_dict()) == set(base_state)


def test_only_adapter_parameters_train_and_their_count_matches_peft(bases):
    ours = load_pretrained(bases["untied"])
    inject_lora(ours, "q_proj,v_proj", r=4, additional_target="lm_head,norm")
    trainable = {name: p for name, p in ours.named_parameters() if p.requires_grad}
    assert all("lora_" in name or name == "lm_head.weight" or "norm" in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert len(trainable) == 2 * 2 * TINY["num_hidden_layers"] + 1 + 1 + 2 * TINY["num_hidden_layers"]
    theirs = peft.get_peft_model(
        reference(bases["untied"]),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "norm"]),
    )
    assert sum(p.numel() for p in trainable.values()) == theirs.get_nb_trainable_parameters()[0]


def test_lora_gradients_match_peft(bases, tmp_path):
    theirs = peft.get_peft_model(
        reference(bases["untied"]),
        peft.LoraConfig(
            r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"]
        ),
    )
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_pretrained(bases["untied"])
    load_adapter(ours, tmp_path)
    ids, labels = batch()
    theirs(input_ids=ids, labels=labels).loss.backward()
    ours(ids, labels=labels).loss.backward()
    ours_by_key = adapter_parameters(ours)
    their_trainable = {peft_key(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(their_trainable) == set(ours_by_key)
    for key, param in their_trainable.items():
        error = (ours_by_key[key].grad - param.grad).norm() / param.grad.norm()
        assert error < 1e-4, key


def test_unknown_target_names_the_modules_that_exist(bases):
    ours = load_pretrained(bases["untied"])
    with pytest.raises(ChipspanError) as error:
        inject_lora(ours, "qproj")
    assert str(error.value) == (
        "lora_target 'qproj' matches no module; this model has: "
        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    )
    with pytest.raises(ChipspanError, match="additional_target 'lm_heads' matches no module; .*embed_tokens"):
        inject_lora(ours, "q_proj", additional_target="lm_heads")
    with pytest.raises(ChipspanError, match="'mlp' selects model.layers.0.mlp, which is not a linear layer"):
        inject_lora(ours, "mlp")
    assert not any(isinstance(m, LoraLinear) for m in ours.modules())


def test_fp16_base_with_fp32_lora_runs_and_returns_fp16(bases):
    ours = load_pretrained(bases["untied"], dtype=torch.float16)
    inject_lora(ours, "q_proj,v_proj")
    perturb_trainable(ours)
    layer = ours.model.layers["0"].self_attn.q_proj
    assert layer.weight.dtype == torch.float16 and layer.lora_A.weight.dtype == torch.float32
    ids, labels = batch()
    out = ours(ids, labels=labels)
    assert out.logits.dtype == torch.float16 and torch.isfinite(out.logits).all()
    out.loss.backward()
    assert layer.lora_B.weight.grad.dtype == torch.float32 and layer.weight.grad is None


def test_fp32_additional_targets_on_fp16_base_train_under_autocast(bases):
    ours = load_pretrained(bases["untied"], dtype=torch.float16)
    inject_lora(ours, "q_proj", additional_target="embed_tokens,lm_head,norm")
    assert ours.lm_head.weight.dtype == torch.float32
    assert ours.model.layers["0"].mlp.up_proj.weight.dtype == torch.float16
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.float16):
        out = ours(ids, labels=labels)
    out.loss.backward()
    assert out.logits.dtype == torch.float16 and torch.isfinite(out.loss)
    assert ours.lm_head.weight.grad.dtype == torch.float32 and torch.isfinite(ours.lm_head.weight.grad).all()


def test_a_stage_loads_and_saves_only_its_part(bases, tmp_path):
    whole = load_pretrained(bases["untied"])
    inject_lora(whole, "q_proj,o_proj", additional_target="embed_tokens,lm_head")
    perturb_trainable(whole)
    save_adapter(whole, tmp_path, bases["untied"])
    first = load_pretrained(bases["untied"], layers=[0], head=False)
    last = load_pretrained(bases["untied"], layers=[1], embed=False)
    assert load_adapter(last, tmp_path) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]
    load_adapter(first, tmp_path)
    parts = {**adapter_state_dict(first), **adapter_state_dict(last)}
    full = adapter_state_dict(whole)
    assert parts.keys() == full.keys()
    assert all(torch.equal(parts[key], full[key]) for key in full)


def test_unsupported_or_mismatched_adapters_are_refused_before_loading(bases, tmp_path):
    ours = load_pretrained(bases["untied"])
    inject_lora(ours, "q_proj")
    save_adapter(ours, tmp_path, None)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    fresh = load_pretrained(bases["untied"])
    for field, value in (("use_dora", True), ("rank_pattern", {"q_proj": 2}), ("layers_to_transform", [0])):
        config_file.write_text(json.dumps({**config, field: value}))
        with pytest.raises(ChipspanError, match=field):
            load_adapter(fresh, tmp_path)
    config_file.write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(ChipspanError, match=r"shape mismatch: .*q_proj.lora_A.weight \(8, 64\) vs \(4, 64\)"):
        load_adapter(fresh, tmp_path)
    config_file.write_text(json.dumps({**config, "target_modules": ["q_proj", "k_proj"]}))
    with pytest.raises(ChipspanError, match=r"missing keys: .*k_proj.lora_A.weight"):
        load_adapter(fresh, tmp_path)
    config_file.write_text(json.dumps({**config, "target_modules": ["k_proj"]}))
    with pytest.raises(ChipspanError, match=r"unexpected keys: .*q_proj.lora_A.weight"):
        load_adapter(fresh, tmp_path)
    assert not any(isinstance(m, LoraLinear) for m in fresh.modules())
    assert all(p.requires_grad for p in fresh.parameters())


BAD_CONFIGS = [
    ("[1]", "holds a JSON list, not an object of LoRA settings"),
    ("{" * 100_000, "cannot read"),
    ({"r": 0}, "r must be a positive integer, not 0"),
    ({"r": "8"}, 'r must be a positive integer, not "8"'),
    ({"r": True}, "r must be a positive integer, not true"),
    ({"lora_alpha": "16"}, "lora_alpha must be a positive number"),
    ({"lora_alpha": -1}, "lora_alpha must be a positive number"),
    ({"lora_dropout": 1.5}, r"lora_dropout must be a number in \[0, 1\)"),
    ({"use_rslora": "false"}, "use_rslora must be true or false"),
    ({"target_modules": 5}, "target_modules must be a list of module names or a regex"),
    ({"target_modules": ["q_proj", 3]}, "target_modules must be a list of module names or a regex"),
    ({"target_modules": "(q_proj"}, "target_modules must be a list of module names or a regex"),
    # nested repeats and alternations under a repeat backtrack exponentially (safe to run on these names)
    ({"target_modules": "(a+)+x"}, "none nested"),
    ({"target_modules": "(ab|cd)*x"}, "none nested"),
    ({"target_modules": r".*\..*\..*\..*x"}, "3 repeats"),
    ({"target_modules": ["nope"]}, "does not fit this llama model: lora_target 'nope' matches no module"),
    ({"modules_to_save": "lm_head"}, "modules_to_save must be a list of module names"),
]


@pytest.mark.parametrize(
    "change, message",
    BAD_CONFIGS,
    ids=[
        "list",
        "deep",
        "rank-0",
        "rank-text",
        "rank-bool",
        "alpha-text",
        "alpha-negative",
        "dropout",
        "rslora-text",
        "targets-number",
        "targets-mixed",
        "targets-bad-regex",
        "targets-nested-repeat",
        "targets-repeated-branch",
        "targets-many-repeats",
        "targets-unknown",
        "modules-to-save-text",
    ],
)
def test_bad_adapter_configs_are_one_line_naming_the_file(bases, tmp_path, change, message):
    ours = load_pretrained(bases["untied"])
    inject_lora(ours, "q_proj")
    save_adapter(ours, tmp_path, None)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(change if isinstance(change, str) else json.dumps({**config, **change}))
    fresh = load_pretrained(bases["untied"])
    for check in (lambda: check_adapter(fresh.config, tmp_path), lambda: load_adapter(fresh, tmp_path)):
        with pytest.raises(ChipspanError, match=message) as info:
            check()
        assert str(config_file) in str(info.value) and "\n" not in str(info.value)
    assert not any(isinstance(m, LoraLinear) for m in fresh.modules())


def test_bad_adapter_weights_are_refused_before_the_model_loads(bases, tmp_path):
    ours = load_pretrained(bases["untied"])
    inject_lora(ours, "q_proj")
    save_adapter(ours, tmp_path, None)
    config = ours.config
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ChipspanError, match="adapter_model.safetensors is not a readable safetensors file"):
        check_adapter(config, tmp_path)
    weights.unlink()
    with pytest.raises(ChipspanError, match=f"no adapter_model.safetensors \\(or adapter_model.bin\\) in {tmp_path}"):
        check_adapter(config, tmp_path)
    torch.save([torch.zeros(2)], tmp_path / "adapter_model.bin")
    with pytest.raises(ChipspanError, match="adapter_model.bin does not hold a dict of named tensors"):
        check_adapter(config, tmp_path)
    torch.save(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(3, 64)},
        tmp_path / "adapter_model.bin",
    )
    with pytest.raises(ChipspanError, match=r"shape mismatch: .*q_proj.lora_A.weight \(3, 64\) vs \(8, 64\)"):
        check_adapter(config, tmp_path)


def test_train_checks_the_adapter_before_anything_loads(bases, tmp_path):
    ours = load_pretrained(bases["untied"])
    inject_lora(ours, "q_proj")
    save_adapter(ours, tmp_path, None)
    (tmp_path / "adapter_model.safetensors").unlink()
    args = FinetuningArguments(finetuning_type="lora", lora_target="q_proj")
    check_finetuning_arguments(args, ours.config)  # fine without the adapter
    with pytest.raises(ChipspanError, match="no adapter_model.safetensors"):
        check_finetuning_arguments(args, ours.config, str(tmp_path))


_junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 10)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["q_proj", "v_proj", "lm_head", "all-linear", ".*q_proj", "("]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=4,
)
_FIELDS = [
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "target_modules",
    "modules_to_save",
    "ensure_weight_tying",
    "init_lora_weights",
    "peft_type",
    "use_dora",
    "bias",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(_FIELDS), _junk, max_size=4))
def test_any_adapter_config_loads_or_is_one_line(bases, tmp_path, changes):
    """Random field values: the adapter is checked or refused with one ChipspanError line, never a traceback."""
    folder = tmp_path / "adapter"  # one folder for all examples (tmp_path is per test, not per example)
    if not folder.is_dir():
        ours = load_pretrained(bases["untied"])
        inject_lora(ours, "q_proj")
        save_adapter(ours, folder, None)
        (tmp_path / "saved.json").write_text((folder / "adapter_config.json").read_text())
    saved = json.loads((tmp_path / "saved.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**saved, **changes}))
    try:
        check_adapter(ModelConfig.from_folder(bases["untied"]), folder)
    except ChipspanError as exc:
        assert "\n" not in str(exc)
