"""Encoded examples kept on disk, so that a run with the same data and settings skips encoding.

A cache file is ``<cache root>/data/<key>.npz`` (the root is ``$CHIPSPAN_CACHE`` or
``~/.cache/chipspan``): flat int32 ``input_ids`` and ``labels`` and int64 ``offsets`` per split, and
the load's statistics as JSON. The key hashes everything the examples depend on (see :func:`cache_key`).
Files are written to a temporary name and renamed, so a reader never sees half a file; a file that
cannot be read, or whose arrays or statistics do not hold together (offsets, dtypes, token ids outside
the vocabulary), is reported and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np

import chipspan
from chipspan.data.encode import IGNORE_INDEX
from chipspan.data.examples import EncodedExamples
from chipspan.data.stats import DataStats

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
# The code that decides the examples: every file of the data package (its templates and built-in
# registry too) and the tokenizer modules that render chat templates; an edit to any is a new key.
_DATA = Path(__file__).parent
_CODE = (
    *sorted(p for p in _DATA.iterdir() if p.suffix in (".py", ".json")),
    _DATA.parent / "models" / "tokenizer.py",
    _DATA.parent / "models" / "chat_sandbox.py",
)


def cache_key(parts: dict) -> str:
    """A hex key from JSON-able ``parts``, chipspan's version and the encoding code itself."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    digest.update(chipspan.__version__.encode())
    for path in _CODE:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


def cache_path(key: str, root: Path) -> Path:
    return root / "data" / f"{key}.npz"


def load(path: Path, vocab_size: int) -> tuple[dict[str, EncodedExamples], DataStats] | None:
    """The splits and statistics stored at ``path``; None when there is no file or it is unreadable or
    inconsistent (token ids must be below ``vocab_size``)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            splits = {
                name: EncodedExamples(data[f"{name}_input_ids"], data[f"{name}_labels"], data[f"{name}_offsets"])
                for name in SPLITS
            }
            stats = _stats(json.loads(bytes(data["stats"]).decode()))
        for name, examples in splits.items():
            _check_split(name, examples, vocab_size)
        if (stats.train, stats.eval) != (len(splits["train"]), len(splits["eval"])):
            raise ValueError("its statistics count other examples than it holds")
    except Exception as exc:  # any damage at all: the cache is derived, so it is rebuilt
        log.warning(
            "data cache %s is unreadable (%s: %s); encoding again",
            path,
            type(exc).__name__,
            " ".join(str(exc).split())[:200],
        )
        return None
    stats.from_cache = True
    return splits, stats


def _check_split(name: str, examples: EncodedExamples, vocab_size: int) -> None:
    """ValueError unless the arrays are one valid set of examples with ids in the vocabulary."""
    ids, labels, offsets = examples.input_ids, examples.labels, examples.offsets
    if (ids.dtype, labels.dtype, offsets.dtype) != (
        np.int32,
        np.int32,
        np.int64,
    ) or not ids.ndim == labels.ndim == offsets.ndim == 1:
        raise ValueError(f"{name} arrays are not flat int32 ids and labels with int64 offsets")
    if (
        len(ids) != len(labels)
        or not len(offsets)
        or offsets[0] != 0
        or offsets[-1] != len(ids)
        or np.any(np.diff(offsets) < 0)
    ):
        raise ValueError(f"{name} offsets do not fit its {len(ids)} tokens")
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name} holds token ids outside the vocabulary of {vocab_size}")
    trained = labels[labels != IGNORE_INDEX]
    if len(trained) and (trained.min() < 0 or trained.max() >= vocab_size):
        raise ValueError(f"{name} holds labels outside the vocabulary of {vocab_size}")


def _stats(data: object) -> DataStats:
    """The statistics from their JSON; ValueError when any field is missing or of the wrong type."""
    kinds = {f.name: f.type for f in fields(DataStats)}
    if not isinstance(data, dict) or set(data) != set(kinds):
        raise ValueError("its statistics are not DataStats fields")
    counts = [data[k] for k, kind in kinds.items() if kind == "int"]
    reasons = data["dropped"], data["first_dropped"]
    if (
        not all(isinstance(n, int) and not isinstance(n, bool) for n in counts)
        or not isinstance(data["from_cache"], bool)
        or not all(isinstance(r, dict) for r in reasons)
        or not all(isinstance(n, int) for n in reasons[0].values())
        or not all(isinstance(p, list) and all(isinstance(x, str) for x in p) for p in reasons[1].values())
    ):
        raise ValueError("its statistics hold values of the wrong type")
    return DataStats.from_dict(data)


def save(path: Path, splits: dict[str, EncodedExamples], stats: DataStats) -> None:
    """Write atomically (a temporary file in the same folder, then a rename); a failure only warns."""
    arrays = {"stats": np.frombuffer(json.dumps(stats.to_dict()).encode(), dtype=np.uint8)}
    for name in SPLITS:
        arrays[f"{name}_input_ids"] = splits[name].input_ids
        arrays[f"{name}_labels"] = splits[name].labels
        arrays[f"{name}_offsets"] = splits[name].offsets
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the data cache %s (%s); the next run will encode again", path, exc)
        if tmp:
            Path(tmp).unlink(missing_ok=True)
