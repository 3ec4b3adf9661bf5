"""Encoded examples kept on disk, so that a run with the same data and settings skips encoding.

A cache file is ``<cache root>/data/<key>.npz`` (the root is ``$CHIPSPAN_CACHE`` or
``~/.cache/chipspan``): flat int32 ``input_ids`` and ``labels`` and int64 ``offsets`` per split, and
the load's statistics as JSON. The key hashes everything the examples depend on (see :func:`cache_key`).
Files are written to a temporary name and renamed, so a reader never sees half a file; a file that
cannot be read is reported and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

import chipspan
from chipspan.data.examples import EncodedExamples
from chipspan.data.stats import DataStats

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
# The modules whose code decides the examples: an edit to any of them is a new key.
_CODE = ("encode.py", "formats.py", "templates.py", "loader.py", "mixing.py", "sources.py")


def cache_key(parts: dict) -> str:
    """A hex key from JSON-able ``parts``, chipspan's version and the encoding code itself."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    digest.update(chipspan.__version__.encode())
    here = Path(__file__).parent
    for name in _CODE:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:32]


def cache_path(key: str, root: Path) -> Path:
    return root / "data" / f"{key}.npz"


def load(path: Path) -> tuple[dict[str, EncodedExamples], DataStats] | None:
    """The splits and statistics stored at ``path``; None when there is no file or it is unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            splits = {
                name: EncodedExamples(data[f"{name}_input_ids"], data[f"{name}_labels"], data[f"{name}_offsets"])
                for name in SPLITS
            }
            stats = DataStats.from_dict(json.loads(bytes(data["stats"]).decode()))
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("data cache %s is unreadable (%s: %s); encoding again", path, type(exc).__name__, exc)
        return None
    stats.from_cache = True
    return splits, stats


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
