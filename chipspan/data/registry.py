"""The dataset registry: names -> where the data is and how to read it (``dataset_info.json``).

chipspan ships LLaMA-Factory 0.5's ``dataset_info.json`` (commit b988ce0); a ``dataset_info.json``
in ``--dataset_dir`` adds entries and replaces built-in ones of the same name. Its entries are checked
field by field (one error naming the file, the dataset and the field), and a ``file_name`` may not
leave the dataset folder (no absolute path, no ``..``).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePath

from chipspan.errors import ChipspanError

REGISTRY_FILE = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt")
# Entry keys chipspan refuses -> why.
_REFUSED = {
    "ms_hub_url": "is on ModelScope, which chipspan does not load from",
    "script_url": "comes from a loading script, which runs arbitrary code (and datasets 4 dropped them)",
}


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


def lookup(names: str, dataset_dir: str | Path) -> list[DatasetEntry]:
    """The entries for a comma-separated list of names, in order; every name is checked first."""
    builtin, user = builtin_registry(), user_registry(dataset_dir)
    registry = {**builtin, **user}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise ChipspanError("no dataset given: pass --dataset NAME (a name from dataset_info.json)")
    entries = []
    for name in wanted:
        if name not in registry:
            close = difflib.get_close_matches(name, list(registry), n=3)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            where = Path(dataset_dir).absolute() / REGISTRY_FILE
            raise ChipspanError(
                f"unknown dataset '{name}'{hint}: add it to {where} or use a name LLaMA-Factory 0.5's registry has"
            )
        where = Path(dataset_dir).absolute() / REGISTRY_FILE if name in user else "chipspan's built-in registry"
        entries.append(_entry(name, registry[name], builtin=name not in user, where=where))
    return entries


def _entry(name: str, info: object, builtin: bool, where: Path | str = REGISTRY_FILE) -> DatasetEntry:
    """The entry ``name`` of the registry in ``where``; ChipspanError naming the field that is wrong."""
    prefix = f"dataset '{name}' in {where}"
    if not isinstance(info, dict):
        raise ChipspanError(f"{prefix} must be a JSON object with a file_name")
    info = {key: value for key, value in info.items() if value is not None}  # a null field is an absent one
    for key, why in _REFUSED.items():
        if key in info and "hf_hub_url" not in info and "file_name" not in info:
            raise ChipspanError(
                f"dataset '{name}' {why} ({key} '{info[key]}'): save the data as a JSON/JSONL file "
                "and register it with file_name"
            )
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
    columns = _names(prefix, "columns", info.get("columns"), '{"prompt": "instruction"}')
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


def _check_file_name(prefix: str, file_name: str) -> None:
    """Refuse a file_name that is empty or names a place outside the dataset folder."""
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
