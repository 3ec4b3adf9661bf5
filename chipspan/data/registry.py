"""The dataset registry: names -> where the data is and how to read it (``dataset_info.json``).

chipspan ships LLaMA-Factory 0.5's ``dataset_info.json`` (commit b988ce0); a ``dataset_info.json``
in ``--dataset_dir`` adds entries and replaces built-in ones of the same name. Its entries are checked
field by field (one error naming the file, the dataset and the field), and a ``file_name`` may not
leave the dataset folder (no absolute path, no ``..``, no URL).

Data chipspan cannot use is refused, never dropped: sources it does not read (ModelScope, Modelers,
loading scripts, cloud storage, a remote ``dataset_dir``), images/videos/audios columns (it trains text
models), and datasets for stages it does not run (ranking, ``kto_tag``). Every dataset of a run is
checked before one is read, and one error lists the problems of all of them.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePath

from chipspan.data.formats import MEDIA_COLUMNS, TEXT_ONLY
from chipspan.errors import ChipspanError, shown

REGISTRY_FILE = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt")
# Entry keys naming a source chipspan does not read -> why; refused when the entry has no file_name
# or hf_hub_url to read instead.
_REFUSED = {
    "ms_hub_url": "is on ModelScope, which chipspan does not load from",
    "om_hub_url": "is on Modelers (the OpenMind hub), which chipspan does not load from",
    "script_url": "comes from a loading script, which runs arbitrary code (and datasets 4 dropped them)",
    "cloud_file_name": "is in cloud storage (S3 or Google Cloud Storage), which chipspan does not read from",
}
# What marks a dataset for stages chipspan does not run -> (what the dataset is, its stages, their name).
_OTHER_STAGES = {
    "ranking": (
        'is a ranking dataset ("ranking": true: chosen and rejected answers)',
        ("rm", "dpo"),
        "the rm and dpo stages (dpo with its orpo and simpo losses)",
    ),
    "kto_tag": ("labels its answers desirable or undesirable (a kto_tag column)", ("kto",), "the kto stage"),
}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset that chipspan can read: a file (or folder) under ``dataset_dir``, or
    a Hugging Face Hub dataset (``hf_hub_url``, with its ``subset`` and ``split``; no ``file_name``).

    ``columns`` is the entry's column mapping, None when it has none; ``builtin`` says the entry
    comes from LLaMA-Factory 0.5's registry rather than the user's ``dataset_info.json``. ``formatting`` is
    ``alpaca`` or ``sharegpt``; ``tags`` (sharegpt only) names the role/content keys and role values,
    None when the entry has none.
    """

    name: str
    file_name: str | None
    file_sha1: str | None
    columns: dict[str, str] | None
    builtin: bool
    formatting: str = "alpaca"
    tags: dict[str, str] | None = None
    hf_hub_url: str | None = None
    subset: str | None = None
    split: str = "train"


def builtin_registry() -> dict[str, dict]:
    """LLaMA-Factory 0.5's ``dataset_info.json``, as shipped inside the package."""
    text = resources.files("chipspan.data").joinpath("dataset_info_lf05.json").read_text(encoding="utf-8")
    return json.loads(text)


def user_registry(dataset_dir: str | Path) -> dict[str, dict]:
    """Entries of ``dataset_info.json`` in ``dataset_dir``; empty when there is no such file."""
    path = Path(dataset_dir) / REGISTRY_FILE
    if not path.is_file():
        return {}
    try:
        registry = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = " ".join(str(exc).split())
        raise ChipspanError(f"{path.absolute()} is not valid JSON ({reason}): fix it") from exc
    if not isinstance(registry, dict):
        raise ChipspanError(f"{path.absolute()} must hold a JSON object of dataset entries, name -> entry")
    return registry


def lookup(names: str, dataset_dir: str | Path, stage: str | None = None) -> list[DatasetEntry]:
    """The entries for a comma-separated list of names, in order, read for ``stage`` (None: any).

    Every name is checked before one is returned; one error lists the problems of all of them.
    """
    check_dataset_dir(dataset_dir)
    builtin, user = builtin_registry(), user_registry(dataset_dir)
    registry = {**builtin, **user}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise ChipspanError("no dataset given: pass --dataset NAME (a name from dataset_info.json)")

    def entry(name: str) -> DatasetEntry:
        if name not in registry:
            close = difflib.get_close_matches(name, list(registry), n=3)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            where = Path(dataset_dir).absolute() / REGISTRY_FILE
            raise ChipspanError(
                f"unknown dataset '{name}'{hint}: add it to {where} or use a name LLaMA-Factory 0.5's registry has"
            )
        where = Path(dataset_dir).absolute() / REGISTRY_FILE if name in user else "chipspan's built-in registry"
        return _entry(name, registry[name], builtin=name not in user, where=where, stage=stage)

    return each_checked(wanted, entry)


def each_checked(items: list, check: Callable) -> list:
    """``check(item)`` for every dataset item, in order; when any fails, one ChipspanError that
    lists each failure, numbered (the problems of all datasets come out together)."""
    results, problems = [], []
    for item in items:
        try:
            results.append(check(item))
        except ChipspanError as exc:
            problems.append(str(exc))
    if len(problems) == 1:
        raise ChipspanError(problems[0])
    if problems:
        listed = "; ".join(f"({i}) {problem}" for i, problem in enumerate(problems, 1))
        raise ChipspanError(f"problems with {len(problems)} datasets: {listed}")
    return results


def check_dataset_dir(dataset_dir: str | Path) -> None:
    """Refuse LLaMA-Factory 0.9's remote ``dataset_dir`` forms: chipspan reads a local folder."""
    folder = str(dataset_dir)
    fix = "download the data into a folder here and pass it as --dataset_dir"
    if folder == "ONLINE":
        raise ChipspanError(
            "--dataset_dir ONLINE reads every dataset name as a Hub dataset, which chipspan does not do: "
            f"register each dataset in a local {REGISTRY_FILE} (hf_hub_url or file_name) and pass its folder"
        )
    if folder.startswith("REMOTE:"):
        raise ChipspanError(
            f"--dataset_dir {shown(folder, 80)} reads {REGISTRY_FILE} from a Hugging Face Hub dataset "
            f"repository, which chipspan does not do: {fix} "
            f"(huggingface-cli download --repo-type dataset {shown(folder[7:], 60)} --local-dir DIR)"
        )
    if _URL.match(folder):
        raise ChipspanError(f"--dataset_dir {shown(folder, 80)} is a URL and chipspan reads local folders: {fix}")


def _entry(
    name: str, info: object, builtin: bool, where: Path | str = REGISTRY_FILE, stage: str | None = None
) -> DatasetEntry:
    """The entry ``name`` of the registry in ``where``; ChipspanError naming the field that is wrong,
    or listing what chipspan cannot use of it (for ``stage``; None: any stage)."""
    prefix = f"dataset '{name}' in {where}"
    if not isinstance(info, dict):
        raise ChipspanError(f"{prefix} must be a JSON object with a file_name")
    info = {key: value for key, value in info.items() if value is not None}  # a null field is an absent one
    columns = _names(prefix, "columns", info.get("columns"), '{"prompt": "instruction"}')
    unusable = _unusable(name, info, columns or {}, stage)
    if unusable:
        raise ChipspanError("; ".join(unusable))
    if "file_name" not in info and "hf_hub_url" not in info:
        raise ChipspanError(f"{prefix} has no file_name: add one")
    for key in ("file_name", "file_sha1", "hf_hub_url", "subset", "split", "formatting"):
        if info.get(key) is not None and not isinstance(info[key], str):
            raise ChipspanError(f"{prefix}: {key} must be text, not {json.dumps(info[key])[:60]}")
    if "file_name" in info:
        _check_file_name(prefix, info["file_name"])
    formatting = info.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise ChipspanError(
            f"dataset '{name}' uses formatting '{formatting}', which is not supported: "
            f"use one of {', '.join(FORMATTINGS)}"
        )
    if not isinstance(info.get("ranking", False), bool):
        raise ChipspanError(f"{prefix}: ranking must be true or false, not {json.dumps(info['ranking'])[:60]}")
    tags = _names(prefix, "tags", info.get("tags"), '{"role_tag": "role"}')
    hub = None if "file_name" in info else info["hf_hub_url"]
    return DatasetEntry(
        name,
        info.get("file_name"),
        info.get("file_sha1"),
        columns,
        builtin,
        formatting,
        tags,
        hf_hub_url=hub,
        subset=info.get("subset"),
        split=info.get("split") or "train",
    )


def _unusable(name: str, info: dict, columns: dict, stage: str | None) -> list[str]:
    """What of entry ``name`` chipspan cannot use, each said with what to do: a source it does not
    read, media columns, or (for ``stage``; None: any) data for a stage it does not run."""
    problems = [
        f"dataset '{name}' {why} ({key} '{shown(info[key], 60)}'): save the data as a JSON/JSONL file "
        "and register it with file_name"
        for key, why in _REFUSED.items()
        if key in info and "hf_hub_url" not in info and "file_name" not in info
    ]
    media = [column for column in MEDIA_COLUMNS if columns.get(column) is not None]
    if media:
        mapped = ", ".join(f"{column} -> '{shown(columns[column])}'" for column in media)
        problems.append(f"dataset '{name}' maps media columns ({mapped}): {TEXT_ONLY}")
    marked = {"ranking": info.get("ranking") is True, "kto_tag": columns.get("kto_tag") is not None}
    for key, (what, stages, called) in _OTHER_STAGES.items():
        if marked[key] and stage is not None and stage not in stages:
            problems.append(
                f"dataset '{name}' {what}, data for {called}, which chipspan does not run yet: "
                f"pick a dataset with one answer to learn per row for --stage {stage}"
            )
    return problems


def _check_file_name(prefix: str, file_name: str) -> None:
    """Refuse a file_name that is empty or names a place outside the dataset folder."""
    if _URL.match(file_name):
        raise ChipspanError(
            f"{prefix}: file_name '{shown(file_name, 80)}' is a URL and chipspan reads local files: download "
            "it into --dataset_dir and name it by its path inside that folder"
        )
    path = PurePath(file_name)
    if not file_name.strip() or path.is_absolute() or ".." in path.parts or path.parts in ((), (".",)):
        raise ChipspanError(
            f"{prefix}: file_name '{file_name}' is not a file inside --dataset_dir; name the "
            "file by its path inside that folder (no absolute path, no '..')"
        )


def _names(prefix: str, key: str, value: object, example: str) -> dict[str, str] | None:
    """An entry's ``columns`` or ``tags``: None, or an object whose values are text (or null)."""
    if value is not None and not (
        isinstance(value, dict) and all(v is None or isinstance(v, str) for v in value.values())
    ):
        raise ChipspanError(
            f"{prefix}: {key} must be a JSON object of names such as {example}, not {json.dumps(value)[:60]}"
        )
    return value
