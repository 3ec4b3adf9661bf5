"""A folder written whole or not at all: built in a hidden folder beside its place, sealed with its
manifest, then renamed into place. What was there before is replaced only when it was wholly an
earlier run's of the same kind, and only once the new folder is complete (``chipspan convert``,
``chipspan export``).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from chipspan import manifest
from chipspan.errors import ChipspanError


def check_replaceable(out_dir: Path, kind: str, writer: str, overwrite: bool, overwrite_hint: str) -> None:
    """Refuse an ``out_dir`` that is not a folder, or not empty; with ``overwrite``, one that is not
    wholly an earlier ``writer``'s (a sealed folder of ``kind``). ``overwrite_hint`` says how to ask
    for overwriting, e.g. "use overwrite"."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ChipspanError(f"output {out_dir} exists and is not a folder; choose another output folder")
    if not (out_dir.is_dir() and any(out_dir.iterdir())):
        return
    if not overwrite:
        raise ChipspanError(f"output folder {out_dir} is not empty; {overwrite_hint} to replace it")
    earlier = manifest.read(out_dir, kind)
    if earlier is None:
        raise ChipspanError(
            f"output folder {out_dir} was not written by {writer}, and overwriting replaces only a "
            "folder it wrote; choose another output folder, or empty this one"
        )
    others = manifest.unlisted(out_dir, earlier)
    if others:
        raise ChipspanError(
            f"output folder {out_dir} holds {others[0]}, which {writer} did not write; "
            "move it out, or choose another output folder"
        )


@contextmanager
def writing(out_dir: Path, kind: str, settings: dict | None = None) -> Iterator[Path]:
    """Yield a new hidden folder beside ``out_dir`` to write into; when the block ends without an
    error, seal it (manifest of ``kind`` with ``settings``) and rename it to ``out_dir``, replacing an
    earlier one; on any error, remove it. Call :func:`check_replaceable` first."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.writing-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        manifest.seal(tmp, kind, settings)
        _move_into_place(tmp, out_dir, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out_dir: Path, kind: str) -> None:
    """Rename the finished ``tmp`` folder to ``out_dir``; an earlier folder's files go only after."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = tmp.with_name(tmp.name.replace(".writing-", ".replaced-"))
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    manifest.remove_sealed(old, kind)
