"""Where the files in ../shared (beside the repository) are; tests that need them skip without them."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
LLAMA2_TOKENIZER = SHARED / "assets" / "llama2-tokenizer"
SHARED_DATA = SHARED / "data"

needs_llama2_tokenizer = pytest.mark.skipif(
    not LLAMA2_TOKENIZER.is_dir(), reason=f"the Llama-2 tokenizer is not at {LLAMA2_TOKENIZER} (../shared)")
