"""Inputs are never outputs: train, data and convert refuse to write over what they read, before
anything loads, and leave the user's files as they were."""

import hashlib
import os

import pytest
from helpers import command

from chipspan.cli import main


def digests(folder):
    """File path -> SHA-256 of everything under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(argv, capsys, *fragments):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("chipspan: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_output_dir_equal_to_the_model_folder_changes_nothing_in_it(tiny_workspace, capsys, finetuning_type):
    model = tiny_workspace / "model"
    before = digests(model)
    argv = command(tiny_workspace, model, finetuning_type) + ["--overwrite_output_dir"]
    refused(
        argv,
        capsys,
        f"--output_dir {model} is the model folder (--model_name_or_path) {model}",
        "choose another folder",
    )
    assert digests(model) == before


def test_a_link_to_the_model_folder_or_a_folder_inside_it_is_refused(tiny_workspace, tmp_path, capsys):
    model = tiny_workspace / "model"
    before = digests(model)
    link = tmp_path / "link"
    os.symlink(model, link)
    refused(
        command(tiny_workspace, link, "full") + ["--overwrite_output_dir"],
        capsys,
        f"--output_dir {link} is the model folder",
    )
    refused(command(tiny_workspace, model / "out", "lora"), capsys, "lies inside the model folder")
    assert digests(model) == before and not (model / "out").exists()


def test_output_dir_holding_the_dataset_or_an_adapter_is_refused(tiny_workspace, tmp_path, capsys):
    data = tiny_workspace / "data"
    refused(
        command(tiny_workspace, data, "lora") + ["--overwrite_output_dir"],
        capsys,
        f"--output_dir {data} holds the file(s) of dataset 'alpaca_gpt4_zh'",
    )
    adapter = tmp_path / "runs" / "adapter"
    adapter.mkdir(parents=True)
    refused(
        command(tiny_workspace, tmp_path / "runs", "lora") + ["--adapter_name_or_path", str(adapter)],
        capsys,
        "holds the adapter (--adapter_name_or_path)",
    )
    refused(
        command(tiny_workspace, tmp_path / "out", "lora") + ["--logging_dir", str(tiny_workspace / "model")],
        capsys,
        "--logging_dir",
        "is the model folder",
    )


def test_output_paths_that_are_files_are_one_line(tiny_workspace, tmp_path, capsys):
    file = tmp_path / "results.txt"
    file.write_text("mine")
    refused(command(tiny_workspace, file, "lora"), capsys, f"--output_dir {file} is a file, not a folder")
    refused(command(tiny_workspace, file / "out", "lora"), capsys, f"{file} is a file, not a folder")
    assert file.read_text() == "mine"


def data_command(workspace, *extra):
    return [
        "data",
        "--model_name_or_path",
        str(workspace / "model"),
        "--dataset",
        "alpaca_gpt4_zh",
        "--dataset_dir",
        str(workspace / "data"),
        "--template",
        "default",
        "--max_samples",
        "4",
        "--cutoff_len",
        "32",
        *map(str, extra),
    ]


def test_data_out_equal_to_its_input_leaves_the_input_unchanged(tiny_workspace, tmp_path, capsys):
    dataset = tiny_workspace / "data" / "alpaca_gpt4_data_zh.json"
    before = dataset.read_bytes()
    refused(
        data_command(tiny_workspace, "--out", dataset),
        capsys,
        f"--out {dataset} is the file(s) of dataset 'alpaca_gpt4_zh'",
        "choose another file",
    )
    refused(
        data_command(tiny_workspace, "--out", tiny_workspace / "model" / "x.jsonl"),
        capsys,
        "lies inside the model folder",
    )
    refused(data_command(tiny_workspace, "--out", tmp_path), capsys, f"--out {tmp_path} is a folder")
    assert dataset.read_bytes() == before
    out = tmp_path / "encoded.jsonl"
    assert main(data_command(tiny_workspace, "--out", out)) == 0
    assert len(out.read_text().splitlines()) == 4


def test_convert_into_the_folder_of_its_gguf_is_refused(tmp_path, capsys):
    gguf = tmp_path / "models" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    refused(
        ["convert", str(gguf), str(tmp_path / "models"), "--overwrite"],
        capsys,
        f"OUT_DIR {tmp_path / 'models'} holds the GGUF file",
    )
    assert gguf.read_bytes() == b"GGUF"


def test_an_output_dir_in_a_symlink_loop_is_one_line(tiny_workspace, tmp_path, capsys):
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    loop = tmp_path / "a"
    refused(command(tiny_workspace, loop, "lora"), capsys, f"--output_dir {loop} cannot be resolved")
