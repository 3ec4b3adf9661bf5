"""Held-out examples: ``eval_loss`` as the Hugging Face Trainer computes it, and generated answers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from chipspan.args import GeneratingArguments
from chipspan.chips.span import SpannedModel
from chipspan.data import IGNORE_INDEX, Example, collate
from chipspan.infer.generate import SamplingSettings, generate
from chipspan.infer.spanned import SpannedDecoder
from chipspan.models.tokenizer import Tokenizer
from chipspan.train.loop import Precision


@torch.no_grad()
def eval_loss(
    model: SpannedModel, examples: Sequence[Example], pad_id: int, batch_size: int, precision: Precision
) -> float:
    """Mean over examples of their batch's mean token loss, in order, ``batch_size`` at a time.

    This is the Trainer's ``eval_loss``: each batch's loss (mean over its trained tokens) counts
    once per example in the batch.
    """
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(examples), batch_size):
        chunk = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        batch = collate(chunk, pad_id)
        with precision.autocast():
            loss = model(batch["input_ids"], batch["labels"], batch["attention_mask"])
        total += float(loss) * len(chunk)
    model.train(was_training)
    return total / len(examples)


def last_answer(example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the answer is the last run of trained tokens, the prompt all before it."""
    trained = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    if not trained:
        return list(example.input_ids), []
    end = start = trained[-1]
    while start > 0 and example.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(example.input_ids[:start]), list(example.input_ids[start : end + 1])


def sampling_settings(args: GeneratingArguments, seed: int) -> SamplingSettings:
    """The generation flags as sampler settings (greedy without --do_sample)."""
    return SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature if args.do_sample else 0.0,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=seed,
    )


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
