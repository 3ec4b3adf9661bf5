"""What chipspan wrote: ``chipspan_manifest.json``, the one mark chipspan leaves in a folder it writes.

``{"written_by": "chipspan", "version": 1, "kind": K, "files": {name: {"size": bytes, "sha256": hex}},
"settings": {...}}``, in two uses:

- a sealed folder (``kind`` "checkpoint", "converted"): every file in it is chipspan's and listed,
  with its size and sha256. The manifest is written last, once everything else is on the disk, so
  a folder is complete only if its manifest is there and every file matches it (:func:`problem`).
  Removing such a folder removes only the files listed (:func:`remove_sealed`).
- a shared folder (``kind`` "output_dir"): the manifest lists no file; it marks the folder as one
  that chipspan writes its outputs in, beside whatever of the user's is there (see
  ``chipspan.train.checkpoints.owned_outputs``).

Manifests come with folders from others, so one is read as untrusted input: bounded in size, and
only plain file names inside the folder itself (never a path elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "chipspan_manifest.json"
VERSION = 1
_MAX_BYTES = 16 * 2**20  # a manifest of many thousand files is far smaller
_CHUNK = 16 * 2**20


def file_entry(path: Path) -> dict:
    """``{"size": bytes, "sha256": hex}`` of one file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def seal(folder: Path, kind: str, settings: dict | None = None, known: dict[str, dict] | None = None) -> None:
    """List every file in ``folder`` (flat) in its manifest, written and flushed last.

    ``known``: entries (:func:`file_entry`) already computed by whoever wrote those files.
    """
    known = known or {}
    files = {
        p.name: known.get(p.name) or file_entry(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    _write(
        folder, {"written_by": "chipspan", "version": VERSION, "kind": kind, "files": files, "settings": settings or {}}
    )


def mark(folder: Path, kind: str) -> None:
    """Mark ``folder`` as one chipspan writes in (a manifest listing no file), unless it already is."""
    if read(folder, kind) is None:
        _write(folder, {"written_by": "chipspan", "version": VERSION, "kind": kind, "files": {}, "settings": {}})


def read(folder: Path, kind: str) -> dict | None:
    """The manifest of ``folder`` if chipspan wrote it, for a folder of ``kind``; None otherwise."""
    try:
        return _parse(folder, kind)
    except ValueError:
        return None


def problem(folder: Path, kind: str) -> str | None:
    """What makes a sealed folder incomplete or changed (its first problem), None when every file matches."""
    try:
        manifest = _parse(folder, kind)
    except ValueError as exc:
        return str(exc)
    if manifest is None:
        return f"it has no {MANIFEST} (a save that never finished, or not chipspan's)"
    files = manifest["files"]
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            state = "truncated" if size < entry["size"] else "changed"
            return f"{name} is {state} ({size} bytes, {entry['size']} when written)"
    added = unlisted(folder, manifest)
    if added:
        return f"{added[0]} was added after it was written"
    for name, entry in files.items():
        if file_entry(folder / name)["sha256"] != entry["sha256"]:
            return f"{name} has changed since it was written (its sha256 differs)"
    return None


def unlisted(folder: Path, manifest: dict) -> list[str]:
    """Names in ``folder`` that its ``manifest`` does not list (files or folders someone else put there)."""
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST and p.name not in manifest["files"])


def remove_sealed(folder: Path, kind: str) -> None:
    """Delete the files the manifest of ``folder`` lists, then the manifest, then the folder if that
    left it empty (an empty folder goes too); anything else in it stays."""
    manifest = read(folder, kind)
    if manifest is not None:
        for name in manifest["files"]:
            (folder / name).unlink(missing_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def _parse(folder: Path, kind: str) -> dict | None:
    """The manifest, checked to be chipspan's, of ``kind``, and to name only plain files of ``folder``;
    None when there is none; ValueError saying what is wrong with one that is there."""
    file = folder / MANIFEST
    if not file.is_file():
        return None
    if file.stat().st_size > _MAX_BYTES:
        raise ValueError(f"its {MANIFEST} is larger than any chipspan writes")
    try:
        manifest = json.loads(file.read_bytes())
    except (OSError, ValueError):
        raise ValueError(f"its {MANIFEST} cannot be read") from None
    if not (
        isinstance(manifest, dict)
        and manifest.get("written_by") == "chipspan"
        and manifest.get("kind") == kind
        and isinstance(manifest.get("files"), dict)
        and isinstance(manifest.get("settings", {}), dict)
    ):
        raise ValueError(f"its {MANIFEST} is not chipspan's manifest of a {kind} folder")
    for name, entry in manifest["files"].items():
        if not _plain_name(name) or not (
            isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
        ):
            raise ValueError(f"its {MANIFEST} lists {name!r}, which is not a file of that folder")
    return manifest


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..", MANIFEST) and "/" not in name and "\\" not in name and "\0" not in name


def _write(folder: Path, manifest: dict) -> None:
    """Write the manifest through a temporary file, flushed, then renamed into place."""
    tmp = folder / f".{MANIFEST}.tmp"
    with tmp.open("w", encoding="utf-8") as out:
        out.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(folder / MANIFEST)
