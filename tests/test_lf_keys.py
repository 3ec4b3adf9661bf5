"""LLaMA-Factory's own files: every key it reads is known, LLaMA-Factory 0.9 files run as written (paths
aside), and what chipspan does not do is refused in one line that names all of it."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import DEMO_DATA, log_lines
from safetensors.torch import load_file

from chipspan import lf_keys
from chipspan.args import STAGES, known_flags, parse_run_arguments
from chipspan.cli import main
from chipspan.errors import ChipspanError
from chipspan.train.recipe import run_train

FILES = Path(__file__).parent / "fixtures" / "llamafactory"


def llamafactory_keys() -> dict[str, set[str]]:
    """key -> where it comes from (lf-0.5, hf-4.36, lf-0.9, hf-4.57): see fixtures/llamafactory/make_keys.py."""
    lines = (FILES / "keys.txt").read_text().split("\n")
    return {words[0]: set(words[1:]) for words in map(str.split, lines) if words}


def test_every_key_llamafactory_reads_is_known():
    flags = set(known_flags())
    handled = flags | set(lf_keys.RENAMED) | set(lf_keys.IDLE) | set(lf_keys.REFUSED) | set(lf_keys.CONVERTED)
    keys = llamafactory_keys()
    assert len(keys) > 350
    assert sorted(set(keys) - handled) == []


def test_each_key_has_one_meaning():
    flags = set(known_flags())
    idle, refused = set(lf_keys.IDLE), set(lf_keys.REFUSED)
    assert not idle & refused and not (idle | refused | set(lf_keys.RENAMED)) & flags
    assert set(lf_keys.RENAMED.values()) <= flags
    assert set(lf_keys.CONVERTED) <= refused  # values it does not convert are refused unless off
    assert all(flag in flags for values in lf_keys.CONVERTED.values() for flag, _ in values.values())
    assert set(lf_keys.LF09_DEFAULTS) <= flags | set(known_flags("export"))  # export_size is export's


def test_the_keys_that_mark_a_llamafactory_09_run_are_those_05_never_had():
    never_in_05 = {key for key, sources in llamafactory_keys().items() if not sources & {"lf-0.5", "hf-4.36"}}
    assert lf_keys.LF09_ONLY == never_in_05 - set(known_flags())
    assert {"trust_remote_code", "freeze_trainable_layers"} <= lf_keys.LF09_ONLY


def _workspace(tmp_path, tiny_workspace):
    """The tiny model, and a data folder as LLaMA-Factory 0.9 ships one (its dataset_info.json names)."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(DEMO_DATA / "alpaca_zh_demo.json", data / "alpaca_zh_demo.json")
    rows = json.loads((DEMO_DATA / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    (data / "eval_rows.json").write_text(json.dumps(rows[-4:], ensure_ascii=False), encoding="utf-8")
    info = {
        "alpaca_zh_demo": {"file_name": "alpaca_zh_demo.json"},
        "alpaca_zh_demo_eval": {"file_name": "eval_rows.json"},
    }
    (data / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return tiny_workspace / "model", data


def _run(file, model, data, out, *extra):
    """``file`` as a user runs it: only the paths (and a short max_steps) given on the command line."""
    argv = [str(FILES / file), f"model_name_or_path={model}", f"dataset_dir={data}", f"output_dir={out}", *extra]
    said = []
    run_train(parse_run_arguments(argv, {}), report=said.append)
    return said


def test_llamafactory_09_lora_file_runs_with_its_defaults(tmp_path, tiny_workspace):
    model, data = _workspace(tmp_path, tiny_workspace)
    out = tmp_path / "lora"
    said = _run("lora_sft.yaml", model, data, out, "max_steps=2")
    assert [line["current_steps"] for line in log_lines(out)] == [1, 2]
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    lines = "\n".join(said).splitlines()
    lf09, idle = lines[:2]  # before anything else
    assert lf09.startswith("note: settings of LLaMA-Factory 0.9 (") and "template_revision lf-0.9" in lf09
    assert idle.startswith("note: no effect here: trust_remote_code (") and "dataloader_num_workers" in idle
    assert any(
        line.startswith("note: template llama2: LLaMA-Factory 0.9.5's (template_revision lf-0.9)") for line in lines
    )


def test_llamafactory_09_full_file_evaluates_on_its_eval_dataset(tmp_path, tiny_workspace):
    model, data = _workspace(tmp_path, tiny_workspace)
    out = tmp_path / "full"
    said = _run("full_sft.yaml", model, data, out, "max_steps=2")
    evaluated = [line for line in log_lines(out) if line["eval_loss"] is not None]
    assert len(evaluated) == 2 and (out / "model.safetensors").is_file()
    assert any(
        line.startswith("data") and " 8 train + 4 eval examples" in line for line in "\n".join(said).splitlines()
    )


def test_llamafactory_09_freeze_names_choose_the_trained_layers(tmp_path, tiny_workspace):
    model, data = _workspace(tmp_path, tiny_workspace)
    run = parse_run_arguments([str(FILES / "freeze_sft.yaml")], {})
    assert (run.finetuning.num_layer_trainable, run.finetuning.name_module_trainable) == (1, "self_attn")
    out = tmp_path / "freeze"
    _run("freeze_sft.yaml", model, data, out, "max_steps=2")
    before, after = load_file(model / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.layers.3.self_attn.") for name in changed)


def test_llamafactory_09_predict_file_answers_its_eval_dataset(tmp_path, tiny_workspace):
    model, data = _workspace(tmp_path, tiny_workspace)
    adapter = tmp_path / "lora"
    _run("lora_sft.yaml", model, data, adapter, "max_steps=1")
    out = tmp_path / "predict"
    _run("lora_predict.yaml", model, data, out, f"adapter_name_or_path={adapter}")
    answers = (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(answers) == 3


def test_every_harmless_key_runs_and_is_named_once(tmp_path, tiny_workspace):
    model, data = _workspace(tmp_path, tiny_workspace)
    out = tmp_path / "harmless"
    said = _run("harmless.yaml", model, data, out, "max_steps=1")
    (idle,) = [line for line in said if line.startswith("note: no effect here")]
    for key in ("trust_remote_code", "flash_attn", "ddp_find_unused_parameters", "gradient_checkpointing"):
        assert len(re.findall(rf"\b{key}\b", idle)) == 1
    for off in ("quantization_bit", "use_dora", "deepspeed", "optim", "save_strategy", "image_max_pixels"):
        assert off not in idle  # at their off values they ask for nothing: nothing to say
    assert (out / "adapter_model.safetensors").is_file()


def test_what_chipspan_does_not_do_is_refused_in_one_line_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", str(FILES / "refused.yaml"), f"output_dir={out}"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("chipspan: error: 7 problems: (1) --image_max_pixels 262144: images, videos and audio")
    for part in (
        "(3) --deepspeed examples/deepspeed/ds_z3_config.json: chipspan spans the model over chips itself",
        "(4) --quantization_bit 3: must be a whole number 4 or 8",
        "(5) --stage dpo: a preference stage",
        "(6) --optim adafactor: chipspan trains with AdamW",
        "(7) --report_to neptune: a tracker chipspan does not log to",
    ):
        assert part in line
    assert "pref_beta" not in line and not out.exists()


@pytest.mark.parametrize("key", ["deepspeed", "pref_loss", "galore_rank", "export_dir", "ray_num_workers"])
def test_llamafactory_keys_are_never_taken_for_a_misspelled_flag(key):
    try:
        parse_run_arguments([f"--{key}", "2"], {})
    except ChipspanError as error:
        assert "unknown flag" not in str(error) and "did you mean" not in str(error)


@pytest.mark.parametrize(
    "typo, hint",
    [("lora_rnak", " (did you mean --lora_rank?)"), ("deepsped", " (did you mean --deepspeed?)"), ("zzz_top", " (`")],
)
def test_a_hint_names_only_a_key_spelled_almost_the_same(typo, hint):
    with pytest.raises(ChipspanError) as error:
        parse_run_arguments([f"--{typo}", "1"], {})
    assert str(error.value).startswith(f"unknown flag --{typo}{hint}")


def test_converted_keys_set_the_flag_they_mean():
    run = parse_run_arguments(["--save_strategy", "no", "--use_cpu", "true"], {})
    assert (run.training.save_steps, run.chips.device) == (0, "cpu")
    assert parse_run_arguments(["--use_cpu", "false"], {}).chips.device is None
    with pytest.raises(ChipspanError, match="--save_strategy epoch: chipspan checkpoints every save_steps steps"):
        parse_run_arguments(["--save_strategy", "epoch"], {})


def test_llamafactory_05_files_keep_05s_defaults_and_09_files_take_09s():
    lf05 = parse_run_arguments(["--stage", "sft", "--template", "qwen"], {})
    assert (lf05.data.template_revision, lf05.data.cutoff_len) == ("lf-0.5", 1024)
    assert not any("LLaMA-Factory 0.9 (" in note for note in lf05.notices)
    lf09 = parse_run_arguments(["--trust_remote_code", "true", "--template", "qwen"], {})
    assert (lf09.data.template_revision, lf09.data.cutoff_len, lf09.generating.max_new_tokens) == ("lf-0.9", 2048, 1024)
    told = parse_run_arguments(["--trust_remote_code", "--template_revision", "lf-0.5", "--cutoff_len", "512"], {})
    assert (told.data.template_revision, told.data.cutoff_len) == ("lf-0.5", 512)


def test_a_stage_or_method_llamafactory_has_is_named_as_such():
    assert set(lf_keys.OTHER_CHOICES["stage"]) == {"rm", "ppo", "dpo", "kto"} and not set(STAGES.words) & {"rm"}
    with pytest.raises(ChipspanError, match=r"^--stage kto: a preference stage"):
        parse_run_arguments(["--stage", "kto"], {})
    with pytest.raises(ChipspanError, match=r"^--finetuning_type oft: OFT is not in chipspan"):
        parse_run_arguments(["--finetuning_type", "oft"], {})


def test_eval_dataset_and_val_size_are_one_choice(tmp_path, tiny_workspace):
    model, data = _workspace(tmp_path, tiny_workspace)
    argv = [str(FILES / "full_sft.yaml"), f"model_name_or_path={model}", f"dataset_dir={data}", "val_size=0.1"]
    with pytest.raises(ChipspanError, match="--val_size and --eval_dataset both choose the eval rows"):
        run_train(parse_run_arguments([*argv, f"output_dir={tmp_path / 'out'}"], {}), report=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_ddp_timeout_bounds_how_long_a_rank_waits_for_the_others(monkeypatch):
    """LLaMA-Factory's files set ddp_timeout 180000000 so that rank 0 may encode a large dataset while the
    others wait; torchrun ranks join their process group with it."""
    import datetime

    from chipspan.distributed import mesh

    joined = {}
    monkeypatch.setattr(mesh.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(mesh.dist, "init_process_group", lambda backend, **options: joined.update(options))
    monkeypatch.setattr(mesh, "init_device_mesh", lambda *args, **kwargs: None)
    run = parse_run_arguments([str(FILES / "lora_sft.yaml")], {})
    mesh.start(mesh.plan_layout(2, 0, 1, 1), torch.device("cpu"), run.training.ddp_timeout)
    assert joined["timeout"] == datetime.timedelta(seconds=180000000)
    assert parse_run_arguments([], {}).training.ddp_timeout == 1800  # the Hugging Face Trainer's default


def test_tokenized_path_keeps_the_examples_and_later_runs_read_them(tmp_path, tiny_workspace):
    """As in LLaMA-Factory 0.9: the first run encodes and saves; a run that finds them reads them whatever
    its data settings say (here a dataset name that does not exist), and says so."""
    model, data = _workspace(tmp_path, tiny_workspace)
    saved = tmp_path / "tokenized"
    first = tmp_path / "first"
    _run("lora_sft.yaml", model, data, first, "max_steps=2", f"tokenized_path={saved}")
    assert (saved / "chipspan_examples.npz").is_file()
    again = tmp_path / "again"
    said = _run("lora_sft.yaml", model, data, again, "max_steps=2", f"tokenized_path={saved}", "dataset=no_such_one")
    assert any(line.startswith("note: examples read from --tokenized_path") for line in "\n".join(said).splitlines())
    assert [x["loss"] for x in log_lines(again)] == [x["loss"] for x in log_lines(first)]


@pytest.mark.parametrize(
    "setup, message", [("foreign", "holds something chipspan did not write"), ("stream", "turn --streaming off")]
)
def test_tokenized_path_never_writes_over_a_folder_it_did_not_make(tmp_path, tiny_workspace, setup, message):
    model, data = _workspace(tmp_path, tiny_workspace)
    saved = tmp_path / "tokenized"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text("{}")  # what LLaMA-Factory's save_to_disk leaves
    extra = ["streaming=true", "max_steps=2"] if setup == "stream" else ["max_steps=2"]
    if setup == "stream":
        (saved / "dataset_dict.json").unlink()
    with pytest.raises(ChipspanError, match=message):
        _run("lora_sft.yaml", model, data, tmp_path / "out", f"tokenized_path={saved}", *extra)
    assert [p.name for p in saved.iterdir()] == ([] if setup == "stream" else ["dataset_dict.json"])
