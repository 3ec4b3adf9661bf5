"""Run settings: LLaMA-Factory 0.5's flags, YAML files with overrides, and LLaMA-Factory 0.5's chip variables."""

import math
import re

import pytest

from chipspan.args import (
    LR_SCHEDULER_TYPES,
    MIX_STRATEGIES,
    PIPELINE_SCHEDULES,
    TEMPLATE_REVISIONS,
    TOOL_FORMATS,
    flags_help,
    known_flags,
    parse_run_arguments,
)
from chipspan.cli import main
from chipspan.devices import parse_chip_ids
from chipspan.errors import ChipspanError


def test_yaml_then_key_value_then_flags(tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        "model_name_or_path: m\nlearning_rate: 1.0e-4\nfp16: true\nlora_target: q_proj\nnum_train_epochs: 2\n"
    )
    run = parse_run_arguments([str(run_file), "learning_rate=3e-4", "--fp16", "false", "--max_steps", "7"], {})
    assert run.model.model_name_or_path == "m" and run.finetuning.lora_target == "q_proj"
    assert run.training.learning_rate == 3e-4 and run.training.fp16 is False
    assert run.training.num_train_epochs == 2.0 and run.training.max_steps == 7


def test_lf05_defaults_and_bare_boolean_flags():
    run = parse_run_arguments(["--plot_loss", "--do_train", "--lora_alpha", "none"], {})
    assert run.finetuning.plot_loss and run.training.do_train
    assert (run.data.cutoff_len, run.finetuning.lora_rank, run.finetuning.lora_alpha) == (1024, 8, None)
    assert (run.training.max_grad_norm, run.training.seed, run.training.adam_epsilon) == (1.0, 42, 1e-8)


def test_sophgo_environment_sets_device_and_chips():
    run = parse_run_arguments([], {"USE_SOPHGO": "1", "SOPHGO_SPLIT": "4", "CHIPS": "2"})
    assert (run.chips.device, run.chips.chips) == ("tpu", "2-5")
    assert parse_run_arguments(["--chips", "0-1"], {"SOPHGO_SPLIT": "4"}).chips.chips == "0-1"  # flags win


@pytest.mark.parametrize(
    "argv,env,message",
    [
        (["--learning_rate", "fast"], {}, "--learning_rate takes a number, not 'fast'"),
        (["--max_steps", "2.5"], {}, "--max_steps takes a whole number, not '2.5'"),
        (["--fp16=maybe"], {}, "--fp16 takes true or false, not 'maybe'"),
        (["--outptu_dir", "x"], {}, "unknown flag --outptu_dir (did you mean --output_dir?)"),
        (["stray"], {}, "cannot read argument 'stray'"),
        ([], {"SOPHGO_SPLIT": "two"}, "must be whole numbers"),
    ],
)
def test_bad_settings_are_named(argv, env, message):
    with pytest.raises(ChipspanError, match=re.escape(message)):
        parse_run_arguments(argv, env)


def test_chip_lists():
    assert parse_chip_ids("0-3") == [0, 1, 2, 3] and parse_chip_ids("4,5") == [4, 5] and parse_chip_ids(None) == [0]
    with pytest.raises(ChipspanError, match="not contiguous"):
        parse_chip_ids("0,2")


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("learning_rate", "inf", "--learning_rate inf: must be a finite number > 0 (e.g. 5e-05)"),
        ("learning_rate", "nan", "--learning_rate nan: must be a finite number > 0"),
        ("learning_rate", "0", "--learning_rate 0.0: must be a finite number > 0"),
        ("logging_steps", "0", "--logging_steps 0: must be a whole number >= 1 (e.g. 500)"),
        ("save_steps", "-5", "--save_steps -5: must be a whole number >= 0 (e.g. 500)"),
        ("eval_steps", "0", "--eval_steps 0: must be a whole number >= 1 (e.g. 100)"),
        ("warmup_ratio", "1.5", "--warmup_ratio 1.5: must be a finite number in [0, 1] (e.g. 0.1)"),
        ("val_size", "2.5", "--val_size 2.5: must be a finite number in [0, 1) or a whole count >= 1"),
        ("lora_dropout", "1", "--lora_dropout 1.0: must be a finite number in [0, 1)"),
        ("weight_decay", "-0.1", "--weight_decay -0.1: must be a finite number >= 0"),
        ("max_grad_norm", "-inf", "--max_grad_norm -inf: must be a finite number >= 0"),
        ("adam_beta2", "1", "--adam_beta2 1.0: must be a finite number in [0, 1) (e.g. 0.999)"),
        ("adam_epsilon", "0", "--adam_epsilon 0.0: must be a finite number > 0"),
        ("lora_rank", "0", "--lora_rank 0: must be a whole number >= 1 (e.g. 8)"),
        ("lora_alpha", "-16", "--lora_alpha -16.0: must be a finite number > 0 (e.g. 16)"),
        ("cutoff_len", "0", "--cutoff_len 0: must be a whole number >= 1 (e.g. 1024)"),
        ("per_device_train_batch_size", "0", "--per_device_train_batch_size 0: must be a whole number in [1, 1048576]"),
        ("gradient_accumulation_steps", str(10**9), "--gradient_accumulation_steps 1000000000: must be a whole number"),
        ("max_samples", "0", "--max_samples 0: must be a whole number >= 1"),
        ("temperature", "0", "--temperature 0.0: must be a finite number > 0 (e.g. 0.95)"),
        ("top_p", "0", "--top_p 0.0: must be a finite number in (0, 1] (e.g. 0.7)"),
        ("top_k", "-1", "--top_k -1: must be a whole number >= 0 (e.g. 50)"),
        ("max_new_tokens", "0", "--max_new_tokens 0: must be a whole number >= 1 (e.g. 512)"),
        ("usable_fraction", "0", "--usable_fraction 0.0: must be a finite number in (0, 1] (e.g. 0.9)"),
        ("seed", "-1", "--seed -1: must be a whole number in [0, 4294967295] (e.g. 42)"),
        ("chip_memory", "0GiB", "--chip_memory 0GiB: must be a size above 0, e.g. 16GiB or 500MB"),
        ("chip_memory", "9" * 400 + "GB", "--chip_memory 9999999999999999999999999999999999999...: must be a size"),
        ("max_steps", "9" * 5000, "--max_steps takes a whole number, not '9999"),
    ],
)
def test_out_of_range_values_are_refused_with_the_range(flag, value, message):
    with pytest.raises(ChipspanError) as error:
        parse_run_arguments([f"--{flag}", value], {})
    assert str(error.value).startswith(message)


def test_every_float_flag_refuses_nan_and_infinity():
    floats = [name for name, (_, _, kind) in known_flags().items() if float in getattr(kind, "__args__", (kind,))]
    assert "learning_rate" in floats and "repetition_penalty" in floats
    for name in floats:
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(ChipspanError, match=f"^--{name} {value}: must be a finite number"):
                parse_run_arguments([f"--{name}", value], {})


def test_yaml_values_of_the_wrong_kind_are_named(tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("learning_rate: true\n")
    with pytest.raises(ChipspanError, match="^--learning_rate takes a number, not 'True'$"):
        parse_run_arguments([str(run_file)], {})
    run_file.write_text("output_dir: [a, b]\n")
    with pytest.raises(ChipspanError, match="^--output_dir takes text, not a list"):
        parse_run_arguments([str(run_file)], {})


def test_values_at_the_ends_of_their_ranges_are_accepted():
    run = parse_run_arguments(
        [
            "--warmup_ratio",
            "1",
            "--val_size",
            "3",
            "--top_p",
            "1",
            "--top_k",
            "0",
            "--max_grad_norm",
            "0",
            "--usable_fraction",
            "1",
            "--seed",
            str(2**32 - 1),
        ],
        {},
    )
    assert (run.training.warmup_ratio, run.data.val_size, run.generating.top_p) == (1.0, 3.0, 1.0)


# ---- fixed choices ------------------------------------------------------------------------------

CHOICE_FLAGS = {name: f.metadata["choices"] for name, (_, f, _) in known_flags().items() if "choices" in f.metadata}


def test_every_fixed_choice_flag_declares_its_choices():
    assert sorted(CHOICE_FLAGS) == sorted(
        [
            "stage",
            "finetuning_type",
            "name_module_trainable",
            "lr_scheduler_type",
            "eval_strategy",
            "report_to",
            "template_revision",
            "tool_format",
            "mix_strategy",
            "pipeline_schedule",
            "launcher",
            "quantization_type",
            "optim",
        ]
    )


def _refusal(argv: list[str]) -> str:
    with pytest.raises(ChipspanError) as error:
        parse_run_arguments(argv, {})
    return str(error.value)


@pytest.mark.parametrize("name", sorted(CHOICE_FLAGS))
def test_a_bad_choice_is_one_line_with_the_valid_values(name, tmp_path):
    choices = CHOICE_FLAGS[name]
    message = f"--{name} zzz is not {choices.describe()}"
    assert _refusal([f"--{name}", "zzz"]) == message
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"{name}: zzz\n")
    assert _refusal([str(run_file)]) == message  # YAML refused the same way
    assert all(word in message for word in choices.words)


@pytest.mark.parametrize("name", sorted(CHOICE_FLAGS))
def test_a_near_miss_says_the_closest_choice(name):
    word = CHOICE_FLAGS[name].words[-1]
    typo = word[:-1] if len(word) > 2 else word + "x"
    assert _refusal([f"--{name}", typo]).endswith(f"; did you mean '{word}'?")


@pytest.mark.parametrize("name", sorted(CHOICE_FLAGS))
def test_every_valid_choice_is_accepted(name):
    group, _, _ = known_flags()[name]
    for word in CHOICE_FLAGS[name].words:
        assert getattr(getattr(parse_run_arguments([f"--{name}", word], {}), group), name) == word


@pytest.mark.parametrize("name", sorted(CHOICE_FLAGS))
def test_help_lists_the_choices(name):
    (line,) = [line for line in flags_help().splitlines() if line.strip().startswith(f"--{name} ")]
    assert CHOICE_FLAGS[name].describe() in line


def test_comma_list_choices_are_checked_one_by_one():
    for value in ("mlp,self_attn", " self_attn , mlp ", "all"):
        assert parse_run_arguments(["--name_module_trainable", value], {}).finetuning.name_module_trainable == value
    assert _refusal(["--name_module_trainable", "mlp,self_atn"]) == (
        "--name_module_trainable mlp,self_atn: 'self_atn' is not one of mlp, self_attn "
        "(a comma list of them, or all); did you mean 'self_attn'?"
    )
    assert _refusal(["--name_module_trainable", "mlp,all"]).startswith("--name_module_trainable mlp,all: 'all' is not")
    assert _refusal(["--name_module_trainable", ","]).startswith("--name_module_trainable , is not one of mlp")


def test_an_older_choice_name_is_read_as_the_current_one(tmp_path):
    """--template_revision seed (chipspan's first name for lf-0.5) still works, on the command line and in YAML."""
    assert parse_run_arguments(["--template_revision", "seed"], {}).data.template_revision == "lf-0.5"
    run_file = tmp_path / "run.yaml"
    run_file.write_text("template_revision: seed\n")
    assert parse_run_arguments([str(run_file)], {}).data.template_revision == "lf-0.5"
    assert "(seed = lf-0.5)" in _refusal(["--template_revision", "sead"])


def test_optional_choices_take_none():
    run = parse_run_arguments(["--launcher", "none", "--tool_format", "null"], {})
    assert run.chips.launcher is None and run.data.tool_format is None


@pytest.mark.parametrize("command", ["train", "plan", "data"])
def test_every_command_refuses_a_bad_choice_first(command, capsys):
    assert main([command, "--launcher", "foo", "--model_name_or_path", "/no/such/model"]) == 1
    assert capsys.readouterr().err.splitlines() == ["chipspan: error: --launcher foo is not one of torchrun"]


def test_every_choice_has_an_implementation():
    """Each word the arguments accept reaches code that acts on it (no KeyError after the check)."""
    from chipspan.chips.memory import VIRTUAL_STAGES
    from chipspan.data import template_tools
    from chipspan.data.mixing import mix
    from chipspan.data.templates import TEMPLATES
    from chipspan.distributed.pipeline import SCHEDULES
    from chipspan.train.schedule import lr_factor

    assert tuple(SCHEDULES) == tuple(VIRTUAL_STAGES) == PIPELINE_SCHEDULES.words
    assert tuple(TEMPLATES) == TEMPLATE_REVISIONS.words
    assert set(template_tools._TOOLS) - {"lf-0.5"} == set(template_tools._CALLS) == set(TOOL_FORMATS.words)
    for kind in LR_SCHEDULER_TYPES.words:
        factors = [lr_factor(kind, step, 10, 2) for step in range(10)]
        assert all(0 <= f <= 1 and math.isfinite(f) for f in factors)
    for strategy in MIX_STRATEGIES.words:
        assert set(mix([lambda: "ab", lambda: "c"], strategy)) <= {"a", "b", "c"}
