"""`chipspan data`: encode the dataset exactly as `train` would, and write what the model will see.

One JSON line per example: ``split`` (train or eval), ``input_ids``, ``labels`` and ``text``, the
decoded tokens with special tokens shown and every masked span (label -100: not trained, usually
the prompt) wrapped in ``«`` and ``»``. The counts go to stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from itertools import groupby
from typing import TYPE_CHECKING, TextIO

from chipspan.args import RunArguments
from chipspan.data.encode import IGNORE_INDEX, Example
from chipspan.data.loader import load_dataset_split
from chipspan.data.stats import DataStats
from chipspan.errors import ChipspanError

if TYPE_CHECKING:
    from chipspan.models.tokenizer import Tokenizer

MASK_OPEN, MASK_CLOSE = "«", "»"


def run_data(run: RunArguments, out: str | None = None, err: TextIO | None = None) -> DataStats:
    """Encode ``run``'s dataset and write its examples as JSON lines to ``out`` (None: stdout), and its
    counts to ``err`` (None: the stderr of the moment, not the one at import)."""
    from chipspan.models.tokenizer import Tokenizer

    if not run.model.model_name_or_path:
        raise ChipspanError("pass --model_name_or_path: a model folder, or a folder with only the tokenizer files")
    if not run.data.dataset:
        raise ChipspanError("no dataset given: pass --dataset NAME (a name from dataset_info.json)")
    tokenizer = Tokenizer.from_folder(run.model.model_name_or_path)
    split = load_dataset_split(run.data, tokenizer, run.finetuning.stage, run.training.seed)
    lines = (
        json.dumps(
            {"split": name, "input_ids": ex.input_ids, "labels": ex.labels, "text": marked_text(ex, tokenizer)},
            ensure_ascii=False,
        )
        + "\n"
        for name, examples in (("train", split.train), ("eval", split.eval))
        for ex in examples
    )
    if out is None:
        sys.stdout.writelines(lines)
    else:
        with open(out, "w", encoding="utf-8") as f:
            f.writelines(lines)
    print(split.stats.summary(), file=err or sys.stderr)
    return split.stats


def marked_text(example: Example, tokenizer: Tokenizer) -> str:
    """The example's text with each masked span wrapped in « »."""
    return "".join(f"{MASK_OPEN}{text}{MASK_CLOSE}" if masked else text for masked, text in _spans(example, tokenizer))


def _spans(example: Example, tokenizer: Tokenizer) -> Iterator[tuple[bool, str]]:
    """``(masked, text)`` for each run of masked or trained tokens, in order.

    Each run's text is the growth of the decoded prefix, so spaces and multi-token characters come
    out as in the whole text.
    """
    end, before = 0, ""
    for masked, run in groupby(example.labels, key=lambda label: label == IGNORE_INDEX):
        end += len(list(run))
        text = tokenizer.decode(example.input_ids[:end], skip_special_tokens=False)
        yield masked, text[len(before) :]
        before = text
