"""chipspan export: adapters merged part by part, shards, formats, the chat template, refusals.

References: PEFT (base + adapter, unmerged) for the merged weights' logits, transformers for loading
the exported folder and for ``apply_chat_template``; chipspan's training encoder for the prompt ids.
"""

import json
import os
import shutil
import warnings

import peft
import pytest
import torch
import transformers
from helpers import LLAMA2_TOKENIZER, batch, make_reference

from chipspan.cli import main
from chipspan.data.encode import encode_prompt
from chipspan.data.templates import fix_tokenizer, get_template
from chipspan.models.tokenizer import Tokenizer
from chipspan.models.weights import weight_files

SMALL = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=3)
SMALL_HEADS = dict(num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 3-layer Llama with the Llama-2 tokenizer: (transformers model, folder)."""
    model, folder = make_reference(tmp_path_factory.mktemp("base") / "model", "llama2-mha", **SMALL, **SMALL_HEADS)
    for file in LLAMA2_TOKENIZER.iterdir():
        shutil.copy(file, folder)
    return model, folder


def make_adapter(base_model, folder, seed, **config):
    """A PEFT LoRA adapter with random (non-zero) A and B saved to ``folder``; returns the PEFT model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(
            transformers.AutoModelForCausalLM.from_pretrained(base_model), peft.LoraConfig(r=4, lora_alpha=8, **config)
        )
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.05)
    model.save_pretrained(folder)
    return model.eval()


def export(*flags):
    return main(["export", *map(str, flags)])


def loaded(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def tensors(folder):
    from safetensors import safe_open

    out = {}
    for file in weight_files(folder):
        with safe_open(file, "pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


@pytest.mark.parametrize("size", ["1", "just_above", "just_below", "20KB"])
def test_lora_export_loads_in_transformers_with_the_logits_of_base_plus_adapter(base, tmp_path, size):
    _, folder = base
    peft_model = make_adapter(folder, tmp_path / "adapter", 1, target_modules=["q_proj", "v_proj", "down_proj"])
    base_bytes = sum(t.numel() * t.element_size() for t in tensors(folder).values())  # its one shard
    export_size = {"just_above": f"{base_bytes + 1}B", "just_below": f"{base_bytes - 1}B"}.get(size, size)
    out = tmp_path / "merged"
    code = export(
        "--model_name_or_path", folder, "--adapter_name_or_path", tmp_path / "adapter", "--export_dir", out,
        "--export_size", export_size, "--infer_dtype", "float32",
    )  # fmt: skip
    assert code == 0
    shards = sorted(out.glob("model*.safetensors"))
    assert len(shards) == {"1": 1, "just_above": 1}.get(size, len(shards))
    assert len(shards) > 1 or size in ("1", "just_above")
    assert (out / "model.safetensors.index.json").is_file() == (len(shards) > 1)
    ids, _ = batch(32000)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = loaded(out)(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-5
    # every adapted tensor changed, every other one is the base's exactly
    before, after = tensors(folder), tensors(out)
    assert before.keys() == after.keys()
    adapted = {k for k in before if any(f".{m}." in k for m in ("q_proj", "v_proj", "down_proj"))}
    assert len(adapted) == 3 * 3
    for key in before:
        assert torch.equal(before[key], after[key]) == (key not in adapted), key


def test_two_adapters_are_merged_in_order_and_the_dtype_is_the_bases(base, tmp_path):
    transformers_model, folder = base
    first = make_adapter(folder, tmp_path / "a1", 1, target_modules=["q_proj"])
    second = make_adapter(folder, tmp_path / "a2", 2, target_modules=["q_proj", "o_proj"])
    out = tmp_path / "merged"
    adapters = f"{tmp_path / 'a1'},{tmp_path / 'a2'}"
    assert export("--model_name_or_path", folder, "--adapter_name_or_path", adapters, "--export_dir", out) == 0
    key = "model.layers.1.self_attn.q_proj.weight"
    delta = {
        name: m.base_layer.weight.new_tensor(m.get_delta_weight("default"))
        for model, name in ((first, "a1"), (second, "a2"))
        for n, m in model.named_modules()
        if n.endswith("layers.1.self_attn.q_proj")
    }
    want = transformers_model.state_dict()[key] + delta["a1"] + delta["a2"]
    assert (tensors(out)[key] - want).abs().max() < 1e-6
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        [p.name for p in out.iterdir()], 0o666 & ~umask
    )  # a server running as another user can read them (safetensors alone writes 0600)


def test_legacy_format_writes_bin_shards_that_transformers_loads(base, tmp_path):
    transformers_model, folder = base
    out = tmp_path / "legacy"
    assert (
        export("--model_name_or_path", folder, "--export_dir", out, "--export_legacy_format", "--export_size", "50KB")
        == 0
    )
    assert not list(out.glob("*.safetensors")) and (out / "pytorch_model.bin.index.json").is_file()
    ids, _ = batch(32000)
    with torch.no_grad():
        assert torch.equal(loaded(out)(input_ids=ids).logits, transformers_model(input_ids=ids).logits)


def chat_model(tmp_path, tokenizer_dir, vocab_size):
    """A 1-layer model whose vocabulary fits ``tokenizer_dir``'s tokenizer."""
    _, folder = make_reference(
        tmp_path / "model", "llama2-mha", vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    for file in tokenizer_dir.glob("*token*"):
        shutil.copy(file, folder)
    return folder


CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? 谢谢"},
]


@pytest.mark.parametrize(
    "tokenizer, template, revision",
    [("llama2", "default", "lf-0.5"), ("llama3", "llama3", "lf-0.9"), ("smollm2", "chatml", "lf-0.9")],
)
def test_exported_chat_template_gives_the_prompt_ids_training_used(tmp_path, request, tokenizer, template, revision):
    """The first and the second turn's prompts (the seed's default can differ in history for other
    answers: the test below)."""
    tokenizer_dir = {
        "llama2": LLAMA2_TOKENIZER,
        "llama3": request.getfixturevalue("llama3_tokenizer_dir"),
        "smollm2": request.getfixturevalue("smollm2_dir"),
    }[tokenizer]
    ours = Tokenizer.from_folder(tokenizer_dir)
    folder = chat_model(tmp_path, tokenizer_dir, len(ours))
    out = tmp_path / "merged"
    flags = ["--template", template, "--template_revision", revision]
    assert export("--model_name_or_path", folder, "--export_dir", out, *flags) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    trained = get_template(template, revision, tokenizer=ours)
    fix_tokenizer(ours, trained)
    system = CONVERSATION[0]["content"]
    pairs = [(m["role"], m["content"]) for m in CONVERSATION[1:]]
    first_turn = theirs.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=True)
    assert _ids(first_turn) == encode_prompt(pairs[:1], trained, ours, system)
    later_turn = _ids(theirs.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True))
    assert later_turn == encode_prompt(pairs, trained, ours, system)
    # the stop words are EOS ids of the generation config, so transformers and vLLM stop there
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    assert {ours.token_to_id(word) for word in trained.stop_words} | {ours.eos_token_id} == set(eos)


def test_template_auto_keeps_the_models_own_chat_template(tmp_path, smollm2_dir):
    """--template auto trained with the model's own template: that template is what the export keeps."""
    ours = Tokenizer.from_folder(smollm2_dir)
    folder = chat_model(tmp_path, smollm2_dir, len(ours))
    out = tmp_path / "merged"
    assert export("--model_name_or_path", folder, "--export_dir", out, "--template", "auto") == 0
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.chat_template == ours.chat_template
    pairs = [(m["role"], m["content"]) for m in CONVERSATION[1:]]
    trained = get_template("auto", tokenizer=ours)
    got = _ids(theirs.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True))
    assert got == encode_prompt(pairs, trained, ours, CONVERSATION[0]["content"])


def _ids(encoded):
    """transformers 4.x returns a list of ids, 5.x a BatchEncoding."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_the_seed_default_template_differs_only_in_history_and_says_so(base, tmp_path, capsys):
    """Training tokenizes 'Assistant: ' and the answer apart (two word starts); one text cannot."""
    _, folder = base
    assert export("--model_name_or_path", folder, "--export_dir", tmp_path / "out", "--template", "default") == 0
    assert "differs from training's ids in later turns' history" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--export_dir", "{out}"], "needs --model_name_or_path"),
        (["--model_name_or_path", "{model}"], "needs --export_dir"),
        (
            ["--model_name_or_path", "{model}", "--export_dir", "{out}", "--export_hub_model_id", "me/x"],
            "uploads nothing",
        ),
        (["--model_name_or_path", "{model}", "--export_dir", "{out}", "--export_quantization_bit", "4"], "GPTQ"),
        (["--model_name_or_path", "{model}", "--export_dir", "{out}", "--quantization_bit", "4"], "unquantized base"),
        (["--model_name_or_path", "{model}", "--export_dir", "{out}", "--export_size", "0"], "--export_size 0"),
        (["--model_name_or_path", "{model}", "--export_dir", "{model}"], "which this run reads"),
        (
            [
                "--model_name_or_path",
                "{model}",
                "--export_dir",
                "{out}",
                "--finetuning_type",
                "full",
                "--adapter_name_or_path",
                "{model}",
            ],
            "is for LoRA adapters",
        ),  # fmt: skip
        (["--model_name_or_path", "{model}", "--export_dir", "{out}", "--export_quantization", "q8_0"], "gguf"),
    ],
)
def test_bad_export_flags_are_one_line_and_write_nothing(base, tmp_path, capsys, flags, message):
    _, folder = base
    out = tmp_path / "out"
    flags = [f.format(model=folder, out=out) for f in flags]
    assert export(*flags) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_non_empty_folder_is_kept_and_an_earlier_export_is_replaced_only_when_asked(base, tmp_path, capsys):
    _, folder = base
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert export("--model_name_or_path", folder, "--export_dir", mine) == 1
    assert export("--model_name_or_path", folder, "--export_dir", mine, "--overwrite_output_dir") == 1
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    out = tmp_path / "out"
    assert export("--model_name_or_path", folder, "--export_dir", out) == 0
    assert export("--model_name_or_path", folder, "--export_dir", out) == 1
    assert (
        export(
            "--model_name_or_path", folder, "--export_dir", out, "--overwrite_output_dir", "--infer_dtype", "bfloat16"
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "is not empty; add --overwrite_output_dir" in capsys.readouterr().err


def test_a_llamafactory_09_merge_yaml_runs_as_it_is(base, tmp_path, capsys):
    """examples/merge_lora/llama3_lora_sft.yaml's keys: read as LLaMA-Factory 0.9's (export_size 5)."""
    _, folder = base
    make_adapter(folder, tmp_path / "adapter", 1, target_modules=["q_proj"])
    yaml_file = tmp_path / "merge.yaml"
    yaml_file.write_text(
        f"model_name_or_path: {folder}\nadapter_name_or_path: {tmp_path / 'adapter'}\ntemplate: llama2\n"
        f"trust_remote_code: true\nexport_dir: {tmp_path / 'out'}\nexport_size: 5\nexport_device: cpu\n"
        "export_legacy_format: false\n"
    )
    assert export(yaml_file) == 0
    err = capsys.readouterr().err
    assert "settings of LLaMA-Factory 0.9" in err and "template 'llama2' (lf-0.9)" in err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_merging_on_a_chip_writes_what_merging_on_the_cpu_writes(base, tmp_path):
    from helpers import emu_chips

    _, folder = base
    make_adapter(folder, tmp_path / "adapter", 3, target_modules=["q_proj", "up_proj"])
    common = ["--model_name_or_path", folder, "--adapter_name_or_path", tmp_path / "adapter"]
    assert export(*common, "--export_dir", tmp_path / "cpu") == 0
    with emu_chips(2):
        flags = ["--export_dir", tmp_path / "chip", "--export_device", "auto", "--device", "emu", "--chips", "1"]
        assert export(*common, *flags) == 0
    on_cpu, on_chip = tensors(tmp_path / "cpu"), tensors(tmp_path / "chip")
    assert on_cpu.keys() == on_chip.keys() and all(torch.equal(on_cpu[k], on_chip[k]) for k in on_cpu)


def test_chat_with_the_trained_template_sends_training_ids_and_merges_adapters_in_order(base, tmp_path, capsys):
    """`chipspan chat --template` encodes as training did; its greedy answer over two adapters is the
    exported model's (which merged them), generated from those ids."""
    from chipspan.args import parse_run_arguments
    from chipspan.infer.chat import ChatSession
    from chipspan.infer.engine import Engine
    from chipspan.infer.generate import SamplingSettings, generate
    from chipspan.models.weights import load_pretrained

    _, folder = base
    for i in (1, 2):
        make_adapter(folder, tmp_path / f"a{i}", i, target_modules=["q_proj", "v_proj"])
    adapters = f"{tmp_path / 'a1'},{tmp_path / 'a2'}"
    run = parse_run_arguments(
        ["--model_name_or_path", str(folder), "--adapter_name_or_path", adapters, "--template", "llama2",
         "--do_sample", "false", "--max_new_tokens", "6"], {}
    )  # fmt: skip
    engine = Engine.load(run, report=lambda _: None)
    ours = Tokenizer.from_folder(folder)
    llama2 = get_template("llama2", "lf-0.5", tokenizer=ours)
    prompt = engine.prompt_ids([("user", "Hi")], "Be brief.")
    assert prompt == encode_prompt([("user", "Hi")], llama2, ours, "Be brief.")
    answer = ChatSession(engine, "Be brief.").reply("Hi")
    assert (
        export("--model_name_or_path", folder, "--adapter_name_or_path", adapters, "--export_dir", tmp_path / "m") == 0
    )
    merged = load_pretrained(tmp_path / "m")
    want = generate(merged, prompt, engine.stop_ids, SamplingSettings(max_new_tokens=6, temperature=0.0))
    assert answer == ours.decode(want)
