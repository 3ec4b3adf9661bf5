"""Compile the emu backend's C++ sources on first use and cache the result.

The build lives in ``$CHIPSPAN_CACHE`` (else ``~/.cache/chipspan``) under
``emu-<torch version>-<hash of the sources>``, so a new torch or an edited source builds
afresh and every later process loads the cached module in about a second.
"""

import hashlib
import os
import shutil
from pathlib import Path

import torch

from chipspan.errors import ChipspanError

CSRC = Path(__file__).parent / "csrc"


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def build_dir() -> Path:
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    root = Path(os.environ.get("CHIPSPAN_CACHE") or Path.home() / ".cache" / "chipspan")
    return root / f"emu-{torch.__version__}-{digest.hexdigest()[:12]}"


def missing_tool() -> str | None:
    """Why the backend cannot be built here, or None when the tools are present."""
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: `{compiler}` is not on PATH (install g++ or clang, or set CXX)"
    if not is_ninja_available():
        return "ninja is missing (pip install ninja)"
    return None


def load():
    """Build (first time only) and import the compiled module."""
    problem = missing_tool()
    if problem:
        raise ChipspanError(f"cannot build the emu device: {problem}")
    from torch.utils.cpp_extension import load as load_extension

    if not sources():
        raise ChipspanError(f"the emu C++ sources are missing from this installation ({CSRC}); reinstall chipspan")
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    verbose = os.environ.get("CHIPSPAN_EMU_VERBOSE") == "1"
    try:
        return load_extension(
            name="chipspan_emu",
            sources=[str(p) for p in sources()],
            build_directory=str(directory),
            extra_cflags=["-O2"],
            verbose=verbose,
        )
    except Exception as e:  # compiler errors arrive as RuntimeError, CalledProcessError, OSError…
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ChipspanError(
            f"could not build the emu device in {directory}: {last} (CHIPSPAN_EMU_VERBOSE=1 shows the compiler output)"
        ) from e
