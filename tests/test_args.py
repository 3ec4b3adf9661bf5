"""Run settings: the seed's flags, YAML files with overrides, and the seed's chip variables."""

import pytest

from chipspan.args import parse_run_arguments
from chipspan.devices import parse_chip_ids
from chipspan.errors import ChipspanError


def test_yaml_then_key_value_then_flags(tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("model_name_or_path: m\nlearning_rate: 1.0e-4\nfp16: true\nlora_target: q_proj\n"
                        "num_train_epochs: 2\n")
    run = parse_run_arguments([str(run_file), "learning_rate=3e-4", "--fp16", "false", "--max_steps", "7"], {})
    assert run.model.model_name_or_path == "m" and run.finetuning.lora_target == "q_proj"
    assert run.training.learning_rate == 3e-4 and run.training.fp16 is False
    assert run.training.num_train_epochs == 2.0 and run.training.max_steps == 7


def test_seed_defaults_and_bare_boolean_flags():
    run = parse_run_arguments(["--plot_loss", "--do_train", "--lora_alpha", "none"], {})
    assert run.finetuning.plot_loss and run.training.do_train
    assert (run.data.cutoff_len, run.finetuning.lora_rank, run.finetuning.lora_alpha) == (1024, 8, None)
    assert (run.training.max_grad_norm, run.training.seed, run.training.adam_epsilon) == (1.0, 42, 1e-8)


def test_seed_environment_sets_device_and_chips():
    run = parse_run_arguments([], {"USE_SOPHGO": "1", "SOPHGO_SPLIT": "4", "CHIPS": "2"})
    assert (run.chips.device, run.chips.chips) == ("tpu", "2-5")
    assert parse_run_arguments(["--chips", "0-1"], {"SOPHGO_SPLIT": "4"}).chips.chips == "0-1"  # flags win


@pytest.mark.parametrize("argv,env,message", [
    (["--learning_rate", "fast"], {}, "--learning_rate takes a number, not 'fast'"),
    (["--max_steps", "2.5"], {}, "--max_steps takes a whole number, not '2.5'"),
    (["--fp16=maybe"], {}, "--fp16 takes true or false, not 'maybe'"),
    (["--outptu_dir", "x"], {}, "unknown flag --outptu_dir; did you mean --output_dir?"),
    (["stray"], {}, "cannot read argument 'stray'"),
    ([], {"SOPHGO_SPLIT": "two"}, "must be whole numbers"),
])
def test_bad_settings_are_named(argv, env, message):
    with pytest.raises(ChipspanError, match=message.replace("?", r"\?").replace(".", r"\.")):
        parse_run_arguments(argv, env)


def test_chip_lists():
    assert parse_chip_ids("0-3") == [0, 1, 2, 3] and parse_chip_ids("4,5") == [4, 5] and parse_chip_ids(None) == [0]
    with pytest.raises(ChipspanError, match="not contiguous"):
        parse_chip_ids("0,2")
