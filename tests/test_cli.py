"""The command line: bad input gets one error line, no traceback unless --debug."""

import json
import shutil
import subprocess
import sys

import pytest
from helpers import LLAMA2_TOKENIZER, make_reference, tiny_model, write_gguf


def chipspan(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "chipspan", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_one_error_line(result, *fragments):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chipspan: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture()
def model_folder(tmp_path):
    _, folder = make_reference(tmp_path / "model", "llama2-mha", vocab_size=32000)
    for file in LLAMA2_TOKENIZER.iterdir():
        shutil.copy(file, folder)
    return folder


@pytest.mark.multiprocess
def test_missing_model_folder(tmp_path):
    result = chipspan("chat", "--model_name_or_path", tmp_path / "no-such-model", "--prompt", "hi")
    assert_one_error_line(result, "no-such-model", "does not exist")


@pytest.mark.multiprocess
def test_config_without_model_type(model_folder):
    config = json.loads((model_folder / "config.json").read_text())
    del config["model_type"]
    (model_folder / "config.json").write_text(json.dumps(config))
    result = chipspan("chat", "--model_name_or_path", model_folder, "--prompt", "hi")
    assert_one_error_line(result, "no 'model_type'", "llama, mistral, qwen2")


@pytest.mark.multiprocess
def test_truncated_safetensors_and_debug_traceback(model_folder):
    weights = model_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    result = chipspan("chat", "--model_name_or_path", model_folder, "--prompt", "hi")
    assert_one_error_line(result, "model.safetensors", "truncated")
    debug = chipspan("--debug", "chat", "--model_name_or_path", model_folder, "--prompt", "hi")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.multiprocess
def test_chat_answers_a_prompt(model_folder):
    result = chipspan("chat", "--model_name_or_path", model_folder, "--prompt", "hello", "--max_new_tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.multiprocess
def test_tokenizer_larger_than_the_model_vocabulary(model_folder):
    config = json.loads((model_folder / "config.json").read_text())
    config["vocab_size"] = 1000
    (model_folder / "config.json").write_text(json.dumps(config))
    result = chipspan("chat", "--model_name_or_path", model_folder, "--prompt", "hi")
    assert_one_error_line(result, "32000 tokens", "vocab_size is 1000")


@pytest.mark.multiprocess
def test_adapter_naming_a_module_that_does_not_exist(model_folder, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": 8,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "target_modules": ["qproj"],
                "bias": "none",
            }
        )
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    result = chipspan("chat", "--model_name_or_path", model_folder, "--adapter_name_or_path", adapter, "--prompt", "hi")
    assert_one_error_line(result, "'qproj' matches no module", "q_proj", "v_proj")


@pytest.mark.multiprocess
def test_gguf_of_another_architecture(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_model(), arch="qwen2")
    result = chipspan("convert", tmp_path / "m.gguf", tmp_path / "out")
    assert_one_error_line(result, "GGUF architecture 'qwen2' is not supported; chipspan converts: llama")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("top_p", "0", "--top_p 0.0: must be a finite number in (0, 1] (e.g. 0.7)"),
        ("temperature", "nan", "--temperature nan: must be a finite number > 0"),
        ("max_new_tokens", "0", "--max_new_tokens 0: must be a whole number >= 1"),
        ("seed", "-1", "--seed -1: must be a whole number in [0, 4294967295]"),
    ],
)
def test_chat_sampling_values_are_checked_before_the_model_is_read(tmp_path, capsys, flag, value, message):
    from chipspan.cli import main

    assert main(["chat", "--model_name_or_path", str(tmp_path / "no-model"), f"--{flag}", value, "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"chipspan: error: {message}") and len(err.splitlines()) == 1, err
