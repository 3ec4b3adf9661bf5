"""Property-based fuzzing of what a user types and what a config.json holds: `chipspan plan` (which
loads no weights) either succeeds or refuses with one error line and exit code 1 — never a traceback."""

import contextlib
import io
import json
import math
import os
import tempfile
from pathlib import Path

from helpers import TOY
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chipspan.args import known_flags, parse_run_arguments
from chipspan.cli import main
from chipspan.errors import ChipspanError
from chipspan.train.preflight import check_arguments

# FUZZ_EXAMPLES=2000 for a longer hunt; the suite's 60 take seconds
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-3, 16),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 1e-300, 1e300, -0.0]),
)
flag_values = st.one_of(
    numbers.map(str),
    st.text(max_size=12),
    st.sampled_from(
        ["", "true", "false", "none", "nan", "-inf", "1e999", "0x10", "1_000", "0-3", "auto", "16GiB", "-1GB", " 7 "]
    ),
)
json_values = st.one_of(
    numbers,
    st.none(),
    st.booleans(),
    st.text(max_size=8),
    st.lists(st.integers(-2, 70), max_size=3),
    st.dictionaries(
        st.sampled_from(
            ["type", "rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
        ),
        st.one_of(numbers, st.text(max_size=8)),
        max_size=4,
    ),
)
config_keys = st.sampled_from(
    [
        *TOY,
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "max_position_embeddings",
        "sliding_window",
        "eos_token_id",
        "torch_dtype",
        "hidden_act",
    ]
)


def run_cli(argv):
    """(exit code, stdout, stderr) of ``chipspan ARGV`` in this process; any other exception escapes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_success_or_one_line(code, out, err):
    assert code in (0, 1), (code, err)
    if code == 1:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("chipspan: error: "), err
    else:
        assert "chip" in out


def plan_of(config: dict, *flags):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        return run_cli(["plan", "--model_name_or_path", folder, *flags])


# settings that lead the plan down its other paths: one process per chip, a chip budget, --chips auto
CONTEXTS = st.lists(
    st.sampled_from(
        [
            ("launcher", "torchrun"),
            ("chips", "0-1"),
            ("chips", "auto"),
            ("chip_memory", "1GiB"),
            ("finetuning_type", "freeze"),
            ("finetuning_type", "full"),
            ("pipeline_schedule", "interleaved1f1b"),
        ]
    ),
    max_size=3,
)


@FUZZ
@example([("launcher", "torchrun")], [("pipeline_schedule", "xyz")])  # found by hand: a KeyError in the plan
@given(CONTEXTS, st.lists(st.tuples(st.sampled_from(sorted(known_flags())), flag_values), min_size=1, max_size=3))
def test_any_flag_values_plan_or_refuse_in_one_line(context, flags):
    argv = [part for name, value in [*context, *flags] if name != "model_name_or_path" for part in (f"--{name}", value)]
    assert_success_or_one_line(*plan_of(TOY, "--device", "cpu", *argv))


@FUZZ
@given(
    st.sampled_from([n for n, (_, _, kind) in known_flags().items() if kind in (int, float, int | None, float | None)]),
    numbers,
)
def test_numeric_flags_take_any_number(name, value):
    code, out, err = plan_of(TOY, "--device", "cpu", f"--{name}", str(value))
    assert_success_or_one_line(code, out, err)
    if isinstance(value, float) and not math.isfinite(value):
        assert code == 1 and f"--{name}" in err


@FUZZ
@given(st.dictionaries(config_keys, json_values, min_size=1, max_size=3))
@example({"model_type": "\r"})  # found by this test: a value with a line break broke the one line
def test_any_config_fields_plan_or_refuse_in_one_line(changes):
    code, out, err = plan_of({**TOY, **changes}, "--device", "cpu", "--chips", "0-1", "--json")
    assert_success_or_one_line(code, out, err)
    if code == 0:  # a plan that is printed prices every chip at a positive number of bytes
        chips = json.loads(out)["chips"]
        assert all(chip[kind] >= 0 for chip in chips for kind in ("weights", "activations", "total"))
        assert all(chip["total"] > 0 for chip in chips)


@settings(max_examples=40, deadline=None)
@given(st.one_of(json_values, st.lists(json_values, max_size=3), st.text(max_size=20)))
def test_a_config_json_of_any_shape_is_refused_in_one_line(value):
    code, out, err = plan_of(value)
    assert_success_or_one_line(code, out, err)


@FUZZ
@given(CONTEXTS, st.lists(st.tuples(st.sampled_from(sorted(known_flags())), flag_values), min_size=1, max_size=3))
def test_trains_checks_take_any_flag_values(context, flags):
    """`train`'s (and each torchrun rank's) checks before anything loads, run alone: nothing but a
    ChipspanError comes out, and nothing is written."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(TOY))
        out = Path(folder) / "out"
        argv = [
            "--do_train",
            "--model_name_or_path",
            folder,
            "--dataset",
            "alpaca_gpt4_zh",
            "--output_dir",
            str(out),
            "--lora_target",
            "q_proj",
            "--device",
            "cpu",
        ]
        argv += [
            part
            for name, value in [*context, *flags]
            if name not in ("model_name_or_path", "launcher")
            for part in (f"--{name}", value)
        ]
        try:
            check_arguments(parse_run_arguments(argv, {}))
        except ChipspanError as error:  # the refusal the CLI prints as its one line
            assert str(error).strip()
        assert sorted(p.name for p in Path(folder).iterdir()) == ["config.json"]
