"""--report_to's trackers: a wandb run (offline, no network) holds what trainer_log.jsonl holds, by step,
with the run's settings and name, under output_dir; a tracker whose package is missing is refused in one
line naming the package, before anything loads."""

import json
import os
import struct
import sys

import pytest
from helpers import command, log_lines, run, torchrun, train_flags

from chipspan.args import parse_run_arguments
from chipspan.cli import main
from chipspan.errors import ChipspanError
from chipspan.train.reporting import trackers_wanted

# The .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log chunks in 32 KiB blocks,
# each chunk a 7-byte header (crc32c, length, type) and part of one protobuf Record.
_BLOCK, _HEADER = 32768, 7
_FULL, _LAST = 1, 4


def wandb_records(file):
    """The Record protobufs of an offline wandb run's ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = file.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, position = [], b"", _HEADER
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:  # too short for a chunk header: zero padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        if kind == 0:  # the unwritten rest of the last block
            break
        pending += data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records):
    """{step: {name: value}} of the history records."""
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
    return history


@pytest.fixture()
def wandb_offline(monkeypatch, tmp_path):
    """wandb offline, its own service logs (normally in ~/.cache/wandb) kept in the test's folder."""
    pytest.importorskip("wandb")
    for name in [name for name in os.environ if name.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def test_a_wandb_run_offline_holds_the_logged_numbers_by_step_under_output_dir(tiny_workspace, tmp_path, wandb_offline):
    out = tmp_path / "out"
    run(command(tiny_workspace, out, "lora") + ["--report_to", "wandb", "--run_name", "tiny lora"])
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    history = wandb_history(records)
    logged = log_lines(out)
    assert {step: row["train/loss"] for step, row in history.items()} == {
        line["current_steps"]: line["loss"] for line in logged
    }
    assert [history[line["current_steps"]]["train/learning_rate"] for line in logged] == [
        line["learning_rate"] for line in logged
    ]
    (started,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    assert started.display_name == "tiny lora" and started.project == "chipspan"
    config = {item.key: json.loads(item.value_json) for item in started.config.update}
    assert config["lora_target"] == "q_proj,v_proj" and config["max_steps"] == len(logged)
    assert config["output_dir"] == str(out) and config["report_to"] == "wandb"


def test_wandb_gets_eval_loss_at_its_step_and_names_the_run_after_output_dir(tiny_workspace, tmp_path, wandb_offline):
    out = tmp_path / "out"
    argv = command(tiny_workspace, out, "lora") + ["--report_to", "wandb", "--val_size", "4"]
    run(argv + ["--eval_strategy", "steps", "--eval_steps", "3"])
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    history = wandb_history(records)
    evaluated = {line["current_steps"]: line["eval_loss"] for line in log_lines(out) if line["eval_loss"] is not None}
    assert sorted(evaluated) == [3, 6]
    assert {step: row["eval/loss"] for step, row in history.items() if "eval/loss" in row} == evaluated
    (started,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    assert started.display_name == str(out)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_under_torchrun_the_rank_that_writes_the_log_writes_the_one_wandb_run(tiny_workspace, tmp_path, wandb_offline):
    out = tmp_path / "staged"
    torchrun("-m", "chipspan", "train", *train_flags(tiny_workspace, out, "--report_to", "wandb"))
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_history(wandb_records(run_file))
    assert {step: row["train/loss"] for step, row in history.items()} == {
        line["current_steps"]: line["loss"] for line in log_lines(out)
    }
    assert sorted(history) == [1, 2, 3, 4]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "swanlab"])
def test_a_tracker_whose_package_is_missing_is_refused_before_loading(
    tracker, tiny_workspace, tmp_path, monkeypatch, no_weight_loading, capsys
):
    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed
    out = tmp_path / "out"
    assert main(command(tiny_workspace, out, "lora") + ["--report_to", f"tensorboard,{tracker}"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"chipspan: error: --report_to tensorboard,{tracker} needs the {tracker} package: pip install {tracker} "
        f"(or pip install 'chipspan[{tracker}]'; or pass --report_to none)"
    )
    assert not out.exists()


def test_all_means_every_tracker_that_is_installed(monkeypatch):
    pytest.importorskip("wandb")
    for missing in ("tensorboard", "mlflow", "swanlab"):
        monkeypatch.setitem(sys.modules, missing, None)
    assert trackers_wanted("all") == ["wandb"]


def test_trackers_are_named_as_a_comma_list_a_yaml_list_or_use_swanlab(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("report_to: [tensorboard, wandb]\nuse_swanlab: false\n")
    assert parse_run_arguments([str(file)], {}).training.report_to == "tensorboard,wandb"
    file.write_text("report_to: [tensorboard, wandb]\nuse_swanlab: true\n")
    assert parse_run_arguments([str(file)], {}).training.report_to == "tensorboard,wandb,swanlab"
    assert parse_run_arguments(["--report_to", "mlflow,wandb"], {}).training.report_to == "mlflow,wandb"
    assert parse_run_arguments(["--use_swanlab", "true"], {}).training.report_to == "swanlab"
    for report_to, expected in (("none", "swanlab"), ("wandb", "wandb,swanlab"), ("all", "all")):
        both = ["use_swanlab=true", f"report_to={report_to}"]
        for argv in (both, both[::-1]):  # either order: use_swanlab adds swanlab, as in LLaMA-Factory
            assert parse_run_arguments(argv, {}).training.report_to == expected
    with pytest.raises(ChipspanError, match="^--report_to none,wandb: none stands alone"):
        trackers_wanted("none,wandb")
