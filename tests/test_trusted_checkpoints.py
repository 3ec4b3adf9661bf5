"""Checkpoints and output_dir a user can trust: nothing runs from a checkpoint file, a damaged or
foreign checkpoint is never resumed from, a checkpoint trained otherwise is refused by name, and
chipspan removes (overwrite, rotation) only what it wrote."""

import json
import os
import shutil

import pytest
import torch
from helpers import STEPS, command, run, torchrun, train_flags

from chipspan import manifest
from chipspan.args import parse_run_arguments
from chipspan.chips import span
from chipspan.cli import main
from chipspan.models.config import ModelConfig
from chipspan.models.tokenizer import Tokenizer
from chipspan.precision import choose_precision
from chipspan.train import checkpoints, preflight
from chipspan.train.finetune import count_trainable


@pytest.fixture(scope="module")
def trained(tiny_workspace, tmp_path_factory):
    """A 6-step LoRA run of tiny_workspace as a stop after step 5 leaves it: checkpoint-2 and
    checkpoint-4 (its final checkpoint-6 removed), the outputs of its end."""
    out = tmp_path_factory.mktemp("trained") / "out"
    run(command(tiny_workspace, out, "lora"))
    manifest.remove_sealed(out / f"checkpoint-{STEPS}", checkpoints.CHECKPOINT)
    return out


@pytest.fixture()
def out(trained, tmp_path):
    """A copy of the trained run's output_dir, to damage or resume."""
    return shutil.copytree(trained, tmp_path / "out")


def train(argv, monkeypatch, capsys):
    """``chipspan train`` through the CLI: (exit code, stdout lines, stderr lines)."""
    for name in ("USE_SOPHGO", "SOPHGO_SPLIT", "CHIPS"):
        monkeypatch.delenv(name, raising=False)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.strip().splitlines()


def logged_steps(out):
    return [json.loads(line)["current_steps"] for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def reseal(folder):
    """Seal ``folder`` again as its files now are: what a hostile checkpoint's author would do."""
    settings = manifest.read(folder, checkpoints.CHECKPOINT)["settings"]
    manifest.seal(folder, checkpoints.CHECKPOINT, settings)


class Planted:
    """Unpickling this makes the folder ``marker``: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


# --- no pickle on any load path --------------------------------------------------------------------


@pytest.mark.parametrize("file", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"])
@pytest.mark.parametrize("how", ["output_dir", "resume_from_checkpoint"])
def test_a_planted_pickle_is_refused_in_one_line_and_never_runs(
    tiny_workspace, out, tmp_path, file, how, monkeypatch, capsys
):
    monkeypatch.setattr(span, "load_pretrained", lambda *args, **kwargs: pytest.fail("weights loaded first"))
    marker = tmp_path / "code-ran"
    checkpoint = out / "checkpoint-4"
    torch.save({"state": Planted(marker)}, checkpoint / file)
    reseal(checkpoint)
    argv = command(tiny_workspace, out, "lora")
    if how == "resume_from_checkpoint":
        argv += ["--resume_from_checkpoint", checkpoint]
    code, _, err = train(argv, monkeypatch, capsys)
    assert code == 1 and len(err) == 1, err
    assert f"{checkpoint / file} holds objects other than tensors and plain values" in err[0]
    assert not marker.exists()


@pytest.mark.parametrize(
    "file,content,message",
    [
        ("scheduler.pt", {"unexpected": 1}, "does not hold the training state chipspan saves"),
        ("rng_state.pth", {"python": [], "numpy": {}, "cpu": torch.zeros(3)}, "does not hold the training state"),
        ("trainer_state.json", [], "trainer_state.json is not a trainer state"),
    ],
)
def test_checkpoint_files_of_the_wrong_shape_are_one_line(
    tiny_workspace, out, file, content, message, monkeypatch, capsys
):
    checkpoint = out / "checkpoint-4"
    if file.endswith(".json"):
        (checkpoint / file).write_text(json.dumps(content))
    else:
        torch.save(content, checkpoint / file)
    reseal(checkpoint)
    code, _, err = train(command(tiny_workspace, out, "lora"), monkeypatch, capsys)
    assert code == 1 and len(err) == 1 and message in err[0], err


def test_rng_state_round_trips_through_weights_only_files(tmp_path):
    import random

    import numpy as np

    preflight.seed_everything(3)
    torch.save(checkpoints.rng_state(), tmp_path / "rng_state.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    preflight.seed_everything(0)
    checkpoints.restore_rng_state(checkpoints.read_saved(tmp_path / "rng_state.pth"))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


# --- resume only from an intact checkpoint of the same settings -------------------------------------


def truncate(folder):
    data = (folder / "optimizer.pt").read_bytes()
    (folder / "optimizer.pt").write_bytes(data[: len(data) // 2])


def flip_a_byte(folder):
    data = bytearray((folder / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "adapter_model.safetensors").write_bytes(bytes(data))


DAMAGES = [
    (truncate, "optimizer.pt is truncated"),
    (lambda folder: (folder / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    (flip_a_byte, "adapter_model.safetensors has changed since it was written (its sha256 differs)"),
    (lambda folder: (folder / manifest.MANIFEST).unlink(), "it has no chipspan_manifest.json"),
]


@pytest.mark.parametrize("damage,problem", DAMAGES, ids=["truncated", "missing", "changed", "no-manifest"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(
    tiny_workspace, trained, out, damage, problem, monkeypatch, capsys
):
    damage(out / "checkpoint-4")
    with (out / "trainer_log.jsonl").open("a") as log:
        log.write('{"current_steps": 5, "total_steps": 6, "lo')  # the torn last line of a killed run
    ours = manifest.read(out / "checkpoint-4", checkpoints.CHECKPOINT) is not None
    # a folder without chipspan's manifest is never written over: save elsewhere than step 4 then
    extra = [] if ours else ["--save_steps", "3"]
    left = {p.name: p.read_bytes() for p in (out / "checkpoint-4").iterdir()}
    code, printed, err = train(command(tiny_workspace, out, "lora") + extra, monkeypatch, capsys)
    assert code == 0, err
    notice = next(line for line in printed if line.startswith("notice: not resuming from"))
    assert f"checkpoint-4 ({problem}" in notice and "resuming from checkpoint-2" in notice
    assert any(line.endswith("checkpoint-2 at step 2") for line in printed)
    assert logged_steps(out) == list(range(1, STEPS + 1))
    assert (out / "adapter_model.safetensors").read_bytes() == (trained / "adapter_model.safetensors").read_bytes()
    if ours:  # written again at step 4
        assert checkpoints.damage(out / "checkpoint-4") is None
    else:
        assert {p.name: p.read_bytes() for p in (out / "checkpoint-4").iterdir()} == left


def test_no_intact_checkpoint_is_one_line_and_a_named_damaged_one_is_refused(tiny_workspace, out, monkeypatch, capsys):
    truncate(out / "checkpoint-4")
    (out / "checkpoint-2" / "rng_state.pth").unlink()
    code, _, err = train(command(tiny_workspace, out, "lora"), monkeypatch, capsys)
    assert code == 1 and len(err) == 1
    assert "no checkpoint in" in err[0] and "checkpoint-4 (optimizer.pt is truncated" in err[0]
    assert "checkpoint-2 (rng_state.pth is missing)" in err[0] and "--overwrite_output_dir" in err[0]
    code, _, err = train(
        command(tiny_workspace, out, "lora") + ["--resume_from_checkpoint", out / "checkpoint-4"], monkeypatch, capsys
    )
    assert code == 1 and len(err) == 1
    assert "is not a checkpoint folder chipspan can resume from: optimizer.pt is truncated" in err[0]
    assert logged_steps(out) == list(range(1, STEPS + 1))  # nothing was written


@pytest.mark.parametrize(
    "change,message",
    [
        (["--lora_rank", "16"], "checkpoint-4 was trained with lora_rank 8, this run asks for 16: pass --lora_rank 8"),
        (["--lora_alpha", "32"], "checkpoint-4 was trained with lora_alpha 16, this run asks for 32"),
        (
            ["--lora_target", "q_proj"],
            "checkpoint-4 was trained with lora_target q_proj,v_proj, this run asks for q_proj",
        ),
        (["--finetuning_type", "full"], "checkpoint-4 was trained with finetuning_type lora, this run asks for full"),
    ],
)
def test_a_checkpoint_trained_otherwise_is_refused_with_the_difference(
    tiny_workspace, out, change, message, monkeypatch, capsys
):
    argv = command(tiny_workspace, out, "lora")
    if change[0] == "--finetuning_type":
        argv = [a for a in argv if a not in ("--lora_target", "q_proj,v_proj")]
    code, _, err = train(argv + change, monkeypatch, capsys)
    assert code == 1 and len(err) == 1 and message in err[0], err
    assert logged_steps(out) == list(range(1, STEPS + 1))


def test_a_checkpoint_of_another_model_is_refused(tiny_workspace, out, tmp_path, monkeypatch, capsys):
    other = shutil.copytree(tiny_workspace / "model", tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    argv = command(tiny_workspace, out, "lora")
    argv[argv.index("--model_name_or_path") + 1] = str(other)
    code, _, err = train(argv, monkeypatch, capsys)
    assert code == 1 and len(err) == 1
    assert "checkpoint-4 was trained on a model with rms_norm_eps 1e-06" in err[0] and "has 1e-05" in err[0]


# --- chipspan removes only what it wrote ---------------------------------------------------------


def users_things(out):
    """A note, a folder of the user's, and a folder of theirs that happens to be named checkpoint-1."""
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "rows.json").write_text("[]")
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "weights.bin").write_text("theirs")


def assert_users_things_kept(out):
    assert (out / "notes.txt").read_text() == "mine" and (out / "data" / "rows.json").read_text() == "[]"
    assert (out / "checkpoint-1" / "weights.bin").read_text() == "theirs"


def test_overwrite_removes_the_earlier_run_and_keeps_the_users_files(tiny_workspace, out, monkeypatch, capsys):
    users_things(out)
    (out / "generated_predictions.jsonl").write_text("{}\n")  # as an earlier --do_predict run left it
    argv = command(tiny_workspace, out, "lora") + ["--max_steps", "3", "--lora_rank", "4"]
    code, _, err = train(argv + ["--overwrite_output_dir"], monkeypatch, capsys)
    assert code == 0, err
    assert_users_things_kept(out)
    assert not (out / "generated_predictions.jsonl").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert logged_steps(out) == [1, 2, 3]  # no stale checkpoint-4 or steps 4-6
    code, printed, err = train(argv + ["--max_steps", "4"], monkeypatch, capsys)  # continues from its own end
    assert code == 0, err
    assert any(line.endswith("checkpoint-3 at step 3") for line in printed)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_output_files_of_the_user_are_never_overwritten(tiny_workspace, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    code, _, err = train(command(tiny_workspace, out, "lora") + ["--overwrite_output_dir"], monkeypatch, capsys)
    assert code == 1 and len(err) == 1
    assert "holds config.json, which chipspan did not write and this run would overwrite" in err[0]
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == '{"mine": true}'


@pytest.mark.parametrize("limit,kept", [(1, ["checkpoint-6"]), (2, ["checkpoint-4", "checkpoint-6"])])
def test_rotation_deletes_only_chipspan_checkpoints_older_than_the_new_one(
    tiny_workspace, out, limit, kept, monkeypatch, capsys
):
    users_things(out)
    (out / "checkpoint-4").rename(out / "checkpoint-8")  # a later checkpoint of a run this one replaces
    argv = command(tiny_workspace, out, "lora") + [
        "--resume_from_checkpoint",
        out / "checkpoint-2",
        "--save_total_limit",
        limit,
    ]
    code, _, err = train(argv, monkeypatch, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", *kept]
    assert checkpoints.damage(out / "checkpoint-6") is None
    assert_users_things_kept(out)


def test_a_users_folder_where_a_checkpoint_would_go_is_refused_before_loading(
    tiny_workspace, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "weights.bin").write_text("theirs")
    code, _, err = train(command(tiny_workspace, out, "lora") + ["--overwrite_output_dir"], monkeypatch, capsys)
    assert code == 1 and len(err) == 1
    assert "holds checkpoint-2, which chipspan did not write, and this run would save its step 2 there" in err[0]
    assert [p.name for p in out.iterdir()] == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "weights.bin").read_text() == "theirs"


def test_a_manifest_naming_files_outside_its_folder_is_not_chipspans(tmp_path):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (tmp_path / "precious").write_text("keep")
    (folder / manifest.MANIFEST).write_text(
        json.dumps(
            {
                "written_by": "chipspan",
                "version": 1,
                "kind": "checkpoint",
                "settings": {},
                "files": {"../precious": {"size": 4, "sha256": "0" * 64}},
            }
        )
    )
    assert "lists '../precious', which is not a file of that folder" in checkpoints.damage(folder)
    assert checkpoints.checkpoints_in(tmp_path) == []
    manifest.remove_sealed(folder, checkpoints.CHECKPOINT)
    assert (tmp_path / "precious").read_text() == "keep"


# --- save_only_model: checkpoints to evaluate, never to resume ----------------------------------------

RESUME_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}


def test_save_only_model_checkpoints_hold_the_weights_and_are_never_resumed(
    tiny_workspace, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    argv = command(tiny_workspace, out, "lora") + ["--max_steps", "3", "--save_only_model"]
    code, _, err = train(argv, monkeypatch, capsys)
    assert code == 0, err
    for step in (2, 3):
        names = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "trainer_state.json"} <= names
        assert not names & RESUME_STATE
        assert checkpoints.damage(out / f"checkpoint-{step}") is None  # sealed like any other
    final = (out / "adapter_model.safetensors").read_bytes()
    assert (out / "checkpoint-3" / "adapter_model.safetensors").read_bytes() == final

    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(span, "load_pretrained", lambda *args, **kwargs: pytest.fail("weights loaded first"))
    for named in (None, out / "checkpoint-2"):
        again = argv + ["--max_steps", "6"] + (["--resume_from_checkpoint", named] if named else [])
        code, _, err = train(again, monkeypatch, capsys)
        assert code == 1 and len(err) == 1, err
        refused = named or out / "checkpoint-3"
        assert f"{refused} was saved with --save_only_model: it holds the weights but no optimizer state" in err[0]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_the_disk_check_counts_no_optimizer_state_under_save_only_model(tiny_workspace, monkeypatch):
    asked = []
    monkeypatch.setattr(checkpoints, "check_disk_space", lambda *args: asked.append(args[4]))
    config = ModelConfig.from_folder(tiny_workspace / "model")
    for extra in ([], ["--save_only_model"]):
        arguments = parse_run_arguments([str(a) for a in command(tiny_workspace, "unused", "full")[1:] + extra], {})
        precision = choose_precision(arguments, "cpu")
        preflight.check_disk(
            arguments, config, precision, Tokenizer.from_folder(tiny_workspace / "model"), STEPS, print
        )
    with_optimizer, weights_only = asked
    trainable = count_trainable(config, arguments.finetuning)[0]
    assert with_optimizer - weights_only == 2 * trainable * 4  # AdamW's two fp32 moments per trained element


# --- the disk check counts everything a checkpoint holds --------------------------------------------


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_the_disk_check_counts_everything_a_checkpoint_holds(tiny_workspace, tmp_path, finetuning_type, monkeypatch):
    out = tmp_path / "out"
    argv = command(tiny_workspace, out, finetuning_type)
    run(argv)
    written = sum(p.stat().st_size for p in (out / "checkpoint-4").iterdir())
    final = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    asked = {}
    monkeypatch.setattr(checkpoints, "check_disk_space", lambda *args: asked.update(checkpoint=args[4], final=args[5]))
    arguments = parse_run_arguments(argv[1:], {})
    preflight.check_disk(
        arguments,
        ModelConfig.from_folder(tiny_workspace / "model"),
        choose_precision(arguments, "cpu"),
        Tokenizer.from_folder(tiny_workspace / "model"),
        STEPS,
        print,
    )
    assert written <= asked["checkpoint"] <= 1.1 * written + 128 * 1024
    assert final <= asked["final"] <= 1.1 * final + 128 * 1024


# --- per-stage checkpoints (torchrun) ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiprocess
def test_per_stage_checkpoints_are_sealed_by_rank_zero_and_never_run_a_pickle(tiny_workspace, tmp_path):
    out = tmp_path / "staged"
    torchrun("-m", "chipspan", "train", *train_flags(tiny_workspace, out, "--micro_batches", "2"))
    checkpoint = out / "checkpoint-4"  # the last step's, as every save_steps one
    listed = manifest.read(checkpoint, checkpoints.CHECKPOINT)["files"]
    assert {
        "optimizer-stage0-of-2.pt",
        "optimizer-stage1-of-2.pt",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "scheduler.pt",
        "rng_state.pth",
    } <= set(listed)
    assert set(listed) == {p.name for p in checkpoint.iterdir()} - {manifest.MANIFEST}
    assert checkpoints.damage(checkpoint) is None  # every stage's hash is the file's

    marker = tmp_path / "code-ran"
    torch.save({"state": Planted(marker), "param_groups": [], "kinds": []}, checkpoint / "optimizer-stage1-of-2.pt")
    reseal(checkpoint)
    resumed = torchrun("-m", "chipspan", "train", *train_flags(tiny_workspace, out), succeed=False)
    planted = checkpoint / "optimizer-stage1-of-2.pt"
    assert f"chipspan: error: {planted} holds objects other than tensors" in resumed.stderr
    assert not marker.exists()
