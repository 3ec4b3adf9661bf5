"""`chipspan plan --suggest`: the memory savers that make a job fit its chips, cheapest first, each one
checked by feeding its flags back to `chipspan plan`."""

import json
from pathlib import Path

import pytest
from helpers import LF05_CHIP_FLAGS

from chipspan.cli import main
from chipspan.errors import ChipspanError

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


def _flags(size, finetuning, chips, *extra):
    """LLaMA-Factory 0.5's job of Llama-2 ``size`` on Sophgo chips of 14 GiB: fp16, batch 1, sequence 1024."""
    target = ["--lora_target", "q_proj,v_proj"] if finetuning == "lora" else []
    return [
        "--model_name_or_path",
        str(CONFIGS / f"llama2-{size}.json"),
        "--finetuning_type",
        finetuning,
        *target,
        *LF05_CHIP_FLAGS,
        "--chip_memory",
        "14GiB",
        "--chips",
        chips,
        *extra,
    ]


def _suggest(flags, capsys):
    assert main(["plan", *flags, "--suggest", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _plan(flags, capsys):
    assert main(["plan", *flags, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_7b_full_on_three_chips_takes_8_bit_moments_and_pure_bf16_first(capsys):
    """11 chips as it is; on 3, 8-bit AdamW with bf16 weights is the cheapest fit, then offloading
    (fewer chips, host memory); every suggestion, fed back to the plan, fits as it says."""
    flags = _flags("7b", "full", "0-2")
    answer = _suggest(flags, capsys)
    assert not answer["as_is"]["fits"] and answer["as_is"]["min_chips"] == 11
    suggested = [entry["flags"] for entry in answer["suggestions"]]
    assert suggested[:2] == [["--optim adamw_8bit", "--pure_bf16"], ["--offload_optimizer", "--pure_bf16"]]
    assert answer["suggestions"][0]["drop"] == ["--fp16"]  # --pure_bf16 takes the place of the job's --fp16
    costs = [entry["cost"] for entry in answer["suggestions"]]
    assert costs == sorted(costs)
    for entry in answer["suggestions"]:
        kept = [flag for flag in flags if flag not in entry["drop"]]
        plan = _plan(kept + " ".join(entry["flags"]).split(), capsys)
        assert plan["fits"] and max(chip["total"] for chip in plan["chips"]) == entry["fullest_chip_bytes"]
        assert sum(chip["host"] for chip in plan["chips"]) == entry["host_bytes"]
    offloaded = answer["suggestions"][1]
    assert offloaded["host_bytes"] > 0 and offloaded["min_chips"] < 3


def test_13b_lora_on_one_chip_is_the_8_bit_base_then_the_4_bit_one(capsys):
    answer = _suggest(_flags("13b", "lora", "0"), capsys)
    assert [entry["flags"] for entry in answer["suggestions"]] == [["--quantization_bit 8"], ["--quantization_bit 4"]]
    assert all(entry["fits"] and entry["host_bytes"] == 0 for entry in answer["suggestions"])


def test_recomputation_is_offered_when_it_was_turned_off(capsys):
    """Recomputation is the cheapest saver: alone it brings 7B LoRA without it onto one chip."""
    flags = _flags("7b", "lora", "0", "--disable_gradient_checkpointing")
    answer = _suggest(flags, capsys)
    assert not answer["as_is"]["fits"]
    assert answer["suggestions"][0]["flags"] == ["--disable_gradient_checkpointing false"]
    assert _plan(flags + ["--disable_gradient_checkpointing", "false"], capsys)["fits"]


def test_a_saver_that_saves_nothing_more_is_left_out(capsys):
    """With 8-bit moments and bf16 weights the fullest chip peaks in the optimizer step, not in the
    activations: recomputing on top would cost time for nothing, so it is not suggested."""
    answer = _suggest(_flags("7b", "full", "0-2", "--disable_gradient_checkpointing"), capsys)
    suggested = [entry["flags"] for entry in answer["suggestions"]]
    assert ["--optim adamw_8bit", "--pure_bf16"] in suggested
    assert ["--disable_gradient_checkpointing false", "--optim adamw_8bit", "--pure_bf16"] not in suggested


def test_chips_auto_lists_the_fewest_chips_of_each(capsys):
    """13B full: 21 chips as it is, 4 with bf16 weights and the optimizer in host memory."""
    answer = _suggest(_flags("13b", "full", "auto"), capsys)
    fewest = {" ".join(entry["flags"]): entry["min_chips"] for entry in answer["suggestions"]}
    assert answer["as_is"]["min_chips"] == 21
    assert fewest["--offload_optimizer --pure_bf16"] == 4
    assert all(chips < 21 for chips in fewest.values())


def test_a_job_that_fits_needs_no_saver(capsys):
    assert main(["plan", *_flags("7b", "lora", "0"), "--suggest"]) == 0
    out = capsys.readouterr().out
    assert "(fits, fewest chips 1)" in out and "no saver needed" in out


def test_nothing_fits_says_what_else_to_do(capsys):
    assert main(["plan", *_flags("13b", "full", "0"), "--suggest"]) == 0
    assert "no combination of savers holds it on 1 chip(s): span more chips" in capsys.readouterr().out


def test_suggest_needs_the_memory_of_a_chip():
    flags = _flags("7b", "lora", "0")
    at = flags.index("--chip_memory")
    from chipspan.args import parse_run_arguments
    from chipspan.chips.suggest import suggest

    with pytest.raises(ChipspanError, match="--suggest needs --chip_memory"):
        suggest(parse_run_arguments(flags[:at] + flags[at + 2 :]))
