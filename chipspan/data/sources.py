"""Read a registered dataset's rows from its file or folder: JSON, JSON lines, CSV, Parquet, text.

A ``.json`` file may hold a JSON list of rows or JSON lines, and so may a ``.jsonl`` file (as with
the ``datasets`` library the seed used). A ``.txt`` file gives one row ``{"text": line}`` per line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from pathlib import Path

from chipspan.data.registry import DatasetEntry
from chipspan.errors import ChipspanError

log = logging.getLogger(__name__)

SUFFIXES = ("json", "jsonl", "csv", "parquet", "txt")

_SEED_DATA = "LLaMA-Factory's data/ folder at commit b988ce0 (github.com/hiyouga/LLaMA-Factory)"
# What the seed registry's best-known files are and where they come from, for the missing-file message.
DESCRIPTIONS = {
    "alpaca_data_en_52k.json": "Stanford Alpaca's 52,002 English instruction rows (CC BY-NC 4.0, "
    "github.com/tatsu-lab/stanford_alpaca)",
    "alpaca_data_zh_51k.json": "about 51k Chinese Alpaca instruction rows "
    "(github.com/ymcui/Chinese-LLaMA-Alpaca)",
    "alpaca_gpt4_data_en.json": "52,002 English Alpaca instructions answered by GPT-4 (CC BY-NC 4.0, "
    "the GPT-4-LLM project, github.com/Instruction-Tuning-with-GPT-4/GPT-4-LLM)",
    "alpaca_gpt4_data_zh.json": "48,818 Chinese Alpaca instructions answered by GPT-4, 35 MB (CC BY-NC 4.0, "
    "the GPT-4-LLM project, github.com/Instruction-Tuning-with-GPT-4/GPT-4-LLM)",
    "self_cognition.json": "LLaMA-Factory's self-identity rows with <NAME>/<AUTHOR> placeholders to fill in",
    "oaast_sft.json": "OpenAssistant oasst1 conversations as alpaca rows with history (Apache-2.0)",
    "oaast_sft_zh.json": "689 Chinese OpenAssistant oasst1 conversations as alpaca rows with history "
    "(Apache-2.0)",
    "lima.json": "LIMA's 1,000 curated conversations as alpaca rows with history "
    "(huggingface.co/datasets/GAIR/lima)",
    "c4_demo.json": "a small sample of C4 web text for pre-training demos (ODC-BY)",
    "wiki_demo.txt": "a small sample of Wikipedia text for pre-training demos",
}


def read_rows(entry: DatasetEntry, dataset_dir: str | Path) -> list:
    """All rows of ``entry``'s file, or of every file in its folder (sorted by name)."""
    path = Path(dataset_dir).absolute() / entry.file_name
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        kinds = {_kind(p) for p in files}
        if len(kinds) != 1:
            raise ChipspanError(
                f"dataset '{entry.name}': {path} must hold files of one type ({', '.join(SUFFIXES)})"
            )
    elif path.is_file():
        files = [path]
        _kind(path)
    else:
        raise ChipspanError(_missing(entry, path))
    rows = []
    for file in files:
        data = file.read_bytes()
        if entry.file_sha1 and len(files) == 1:
            _check_sha1(file, data, entry.file_sha1)
        rows += _parse(file, data)
    return rows


def _missing(entry: DatasetEntry, path: Path) -> str:
    message = f"dataset '{entry.name}': file {entry.file_name} not found (looked for {path})"
    description = DESCRIPTIONS.get(entry.file_name) if entry.builtin else None
    if description:
        message += f"; it is {description}, shipped in {_SEED_DATA}"
    return message + "; put it there or point --dataset_dir at the folder that holds it"


def _kind(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in SUFFIXES:
        known = ", ".join("." + s for s in SUFFIXES)
        raise ChipspanError(f"{path}: cannot read .{suffix} files; use one of {known}")
    return suffix


def _check_sha1(path: Path, data: bytes, expected: str) -> None:
    """Warn (one line, as the seed did) when the file is not the one the registry describes."""
    digest = hashlib.sha1(data).hexdigest()
    if digest != expected:
        log.warning(
            "%s: SHA-1 %s does not match file_sha1 %s in dataset_info.json; using the file anyway",
            path, digest, expected,
        )


def _parse(path: Path, data: bytes) -> list:
    kind = _kind(path)
    if kind == "parquet":
        try:
            import pyarrow.parquet
        except ImportError as exc:
            raise ChipspanError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from exc
        return pyarrow.parquet.read_table(io.BytesIO(data)).to_pylist()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ChipspanError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): re-save it as UTF-8"
        ) from exc
    if kind == "txt":
        return [{"text": line} for line in text.splitlines()]
    if kind == "csv":
        return list(csv.DictReader(text.splitlines(keepends=True)))
    return _json_rows(path, text)


def _json_rows(path: Path, text: str) -> list:
    """A JSON list of rows, one JSON object, or JSON lines (blank lines skipped)."""
    try:
        data = json.loads(text)
    except ValueError:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise ChipspanError(
                        f"{path} line {number} is not valid JSON ({exc.msg}): fix the line or remove it"
                    ) from exc
        return rows
    return data if isinstance(data, list) else [data]
