"""Held-out examples answered: the prompts of the eval set, generated answers beside the data's.
(Their ``eval_loss`` is ``chipspan.train.step.eval_loss``.)"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from chipspan.chips.span import SpannedModel
from chipspan.data import Example
from chipspan.data.encode import last_answer
from chipspan.infer.generate import SamplingSettings, generate
from chipspan.infer.spanned import SpannedDecoder
from chipspan.models.tokenizer import Tokenizer


def predictions(
    model: SpannedModel,
    examples: Sequence[Example],
    tokenizer: Tokenizer,
    settings: SamplingSettings,
    stop_ids: set[int],
    progress: Callable[[int], None] = lambda done: None,
) -> list[dict[str, str]]:
    """One ``{"prompt", "predict", "label"}`` per example: the model's answer to the prompt of its
    last turn, beside the answer in the data (texts without special tokens)."""
    decoder = SpannedDecoder(model)
    rows = []
    for done, example in enumerate(examples, 1):
        prompt, answer = last_answer(example)
        predicted = generate(decoder, prompt, stop_ids, settings)
        rows.append(
            {
                "prompt": tokenizer.decode(prompt),
                "predict": tokenizer.decode(predicted),
                "label": tokenizer.decode(answer),
            }
        )
        progress(done)
    return rows
