"""config.json read as untrusted input: every size, number, flag and type checked where it is read,
one line naming the field; `chipspan plan` refuses a bad config instead of printing nonsense."""

import json
import time

import pytest
from helpers import TOY

from chipspan.cli import main
from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig


def write_config(tmp_path, **changes):
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**TOY, **changes}))
    return folder


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"hidden_size": -4096}, "hidden_size in config.json must be a whole number from 1 to 1,048,576, not -4096"),
        ({"hidden_size": "4096"}, 'hidden_size in config.json must be a whole number from 1 to 1,048,576, not "4096"'),
        ({"vocab_size": True}, "vocab_size in config.json must be a whole number from 1 to 16,777,216, not true"),
        ({"intermediate_size": 0}, "intermediate_size in config.json must be a whole number"),
        (
            {"num_hidden_layers": 10**9},
            "num_hidden_layers in config.json must be a whole number from 1 to 4,096, not 1000000000",
        ),
        ({"num_attention_heads": [4]}, "num_attention_heads in config.json must be a whole number"),
        ({"num_attention_heads": 3}, "num_attention_heads 3 in config.json does not divide hidden_size 64"),
        ({"num_key_value_heads": 3}, "num_key_value_heads 3 in config.json does not divide num_attention_heads 4"),
        ({"head_dim": 15}, "head_dim 15 in config.json is odd"),
        ({"rms_norm_eps": 0}, "rms_norm_eps in config.json must be a finite number > 0, not 0"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps in config.json must be a finite number > 0, not NaN"),
        ({"rope_theta": -1.0}, "rope_theta in config.json must be a finite number > 0, not -1.0"),
        ({"rope_theta": float("inf")}, "rope_theta in config.json must be a finite number > 0, not Infinity"),
        ({"rope_scaling": "linear"}, 'rope_scaling in config.json must be a JSON object (or null), not "linear"'),
        (
            {"rope_scaling": {"type": "linear", "factor": -2}},
            "rope_scaling.factor in config.json must be a finite number > 0, not -2",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4}},
            "rope_scaling in config.json: high_freq_factor (4) must be above low_freq_factor (4)",
        ),
        ({"tie_word_embeddings": "false"}, 'tie_word_embeddings in config.json must be true or false, not "false"'),
        ({"eos_token_id": [2, "</s>"]}, "eos_token_id in config.json must be a token id (a whole number) or a list"),
        ({"torch_dtype": 16}, "torch_dtype in config.json must be a string"),
        (
            {"quantization_config": {"quant_method": "gptq", "bits": 4}},
            "config.json is of a model quantized with gptq (quantization_config); chipspan reads 16- and 32-bit",
        ),
    ],
)
def test_bad_config_fields_are_named(changes, message):
    with pytest.raises(ChipspanError) as error:
        ModelConfig.from_dict({**TOY, **changes})
    assert str(error.value).startswith(message)


def test_a_published_grouped_query_config_still_reads():
    config = ModelConfig.from_dict(
        {
            **TOY,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "pad_token_id": -1,
            "eos_token_id": [1, 2],
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
        }
    )
    assert (config.num_key_value_heads, config.head_dim, config.pad_token_id) == (2, 32, -1)


@pytest.mark.parametrize(
    "text,message",
    [
        ("[1, 2]", "must hold a JSON object (name -> value), not a list"),
        ('{"a": ' * 100000 + "1" + "}" * 100000, "is not valid JSON"),
        ('{"hidden_size": ' + "9" * 5000 + "}", "is not valid JSON"),
    ],
)
def test_a_config_json_that_is_not_an_object_is_one_line(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ChipspanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_folder(tmp_path)


def test_plan_refuses_a_negative_hidden_size_and_prints_no_memory(tmp_path, capsys):
    folder = write_config(tmp_path, hidden_size=-64)
    assert main(["plan", "--model_name_or_path", str(folder)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("chipspan: error: hidden_size in ") and "not -64" in err
    assert len(err.strip().splitlines()) == 1


def test_plan_refuses_a_billion_layers_at_once(tmp_path, capsys):
    folder = write_config(tmp_path, num_hidden_layers=10**9)
    started = time.monotonic()
    assert main(["plan", "--model_name_or_path", str(folder), "--chips", "0-3"]) == 1
    assert time.monotonic() - started < 5
    assert "num_hidden_layers in " in capsys.readouterr().err
