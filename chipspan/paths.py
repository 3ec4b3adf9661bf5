"""Inputs are never outputs: where a command writes may not be, hold, or lie inside what it reads.

Every command that writes calls :func:`check_output` before any heavy work, with the paths it reads
(the model folder, adapters, dataset files, a GGUF). Paths are compared as real paths, symlinks
resolved, so a link to the model folder is the model folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from chipspan.adapters.peft_io import adapter_folders
from chipspan.args import DataArguments, RunArguments
from chipspan.errors import ChipspanError


def check_output(path: str | Path, flag: str, inputs: Mapping[str, str | Path | None], kind: str = "folder") -> None:
    """ChipspanError unless ``path`` (given as ``flag``) can be written as a ``kind`` ("folder" or
    "file") without writing over an input: it may not be one of ``inputs`` (how the user named it ->
    path; None: not given), hold one, or lie inside one; nor be a file where a folder goes (or the
    reverse), nor lie under a file."""
    path = Path(path)
    _check_shape(path, flag, kind)
    out = _real(path, flag)
    for name, given in inputs.items():
        if given is None:
            continue
        source = _real(Path(given), name)
        if out == source:
            where = "is"
        elif source in out.parents:
            where = "lies inside"
        elif out in source.parents:
            where = "holds"
        else:
            continue
        raise ChipspanError(
            f"{flag} {path} {where} {name} {given}, which this run reads: choose another {kind} "
            "for the outputs, so nothing of the input is overwritten"
        )


def _check_shape(path: Path, flag: str, kind: str) -> None:
    """A folder goes where no file is, a file where no folder is, and neither under a file."""
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ChipspanError(f"{flag} {path} is a file, not a folder: name a folder (new or empty) for the outputs")
    if kind == "file" and path.is_dir():
        raise ChipspanError(f"{flag} {path} is a folder: name the file to write, e.g. {path / 'encoded.jsonl'}")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ChipspanError(f"{flag} {path} cannot be created: {parent} is a file, not a folder")


def run_inputs(run: RunArguments) -> dict[str, Path | None]:
    """What a run reads, by how the user named it: the model folder, each adapter, the datasets."""
    inputs: dict[str, Path | None] = {"the model folder (--model_name_or_path)": _path(run.model.model_name_or_path)}
    adapters = adapter_folders(run.model.adapter_name_or_path)
    for i, adapter in enumerate(adapters):
        inputs[f"the adapter (--adapter_name_or_path{f', #{i + 1}' if len(adapters) > 1 else ''})"] = adapter
    inputs.update(dataset_inputs(run.data))
    return inputs


def dataset_inputs(data: DataArguments) -> dict[str, Path]:
    """The files and folders ``data``'s datasets (--dataset and --eval_dataset) are read from (Hub datasets
    have none), and the ``dataset_info.json`` that names them."""
    names = ",".join(filter(None, (data.dataset, data.eval_dataset)))
    if not names:
        return {}
    from chipspan.data import registry

    folder = Path(data.dataset_dir)
    try:
        entries = registry.lookup(names, folder)
    except ChipspanError:  # a dataset that cannot be found is not read: loading it says so, after the plan
        entries = []
    inputs = {
        f"the file(s) of dataset '{entry.name}'": folder / entry.file_name
        for entry in entries
        if isinstance(entry.file_name, str)
    }
    if (folder / registry.REGISTRY_FILE).is_file():
        inputs["the dataset registry"] = folder / registry.REGISTRY_FILE
    return inputs


def _real(path: Path, named: str) -> Path:
    """``path`` with every symlink resolved; ChipspanError for a symlink loop or an unreadable path."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ChipspanError(f"{named} {path} cannot be resolved to a real path ({exc}): fix the link") from None


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
