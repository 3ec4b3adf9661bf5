"""The data entry point: dataset names -> encoded training examples."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from chipspan.data import registry, sources
from chipspan.data.encode import Example, encode_pretrain, encode_supervised
from chipspan.data.formats import BadRow, Conversation, converter
from chipspan.data.templates import fix_tokenizer, get_template
from chipspan.errors import ChipspanError

if TYPE_CHECKING:
    from chipspan.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STAGES = ("sft", "pt")


def load_examples(
    dataset: str,
    dataset_dir: str | Path,
    tokenizer: Tokenizer,
    template: str | None = "default",
    cutoff_len: int = 1024,
    stage: str = "sft",
    max_samples: int | None = None,
    template_revision: str = "seed",
) -> list[Example]:
    """Read, convert and encode the comma-separated ``dataset`` names, concatenated in order.

    ``max_samples`` keeps the first N rows of each dataset. Every name, the template and the stage
    are checked before any file is read. The tokenizer is then fixed for the template, as the seed
    did (see ``fix_tokenizer``: a template may add tokens or change EOS).
    """
    if stage not in STAGES:
        raise ChipspanError(f"stage '{stage}' is not supported yet: use one of {', '.join(STAGES)}")
    if cutoff_len < 1:
        raise ChipspanError(f"cutoff_len must be at least 1, got {cutoff_len}")
    entries = registry.lookup(dataset, dataset_dir)
    if stage == "sft" and template is None:
        raise ChipspanError("supervised fine-tuning needs a template: pass --template, e.g. default")
    chosen = get_template(template, template_revision) if template is not None else None

    conversations: list[Conversation] = []
    for entry in entries:
        rows = sources.read_rows(entry, dataset_dir)[:max_samples]
        convert = converter(entry.formatting, entry.columns, entry.tags)
        conversations += _convert(entry.name, rows, convert, need_response=stage == "sft")
    fix_tokenizer(tokenizer, chosen)
    if stage == "pt":
        examples = encode_pretrain([c.prompt[0][1] for c in conversations], tokenizer, cutoff_len)
    else:
        examples = encode_supervised(conversations, chosen, tokenizer, cutoff_len)
    if not examples:
        what = f"no block of {cutoff_len} tokens" if stage == "pt" else "no usable rows"
        raise ChipspanError(
            f"dataset {dataset} gives {what}: check the files and columns in dataset_info.json"
        )
    return examples


def _convert(name: str, rows: list, convert: Callable, need_response: bool) -> list[Conversation]:
    """Conversations of the usable rows; one log line counts the others by reason."""
    kept, dropped, first = [], Counter(), {}
    for number, row in enumerate(rows, 1):
        try:
            conversation = convert(row)
            if need_response and len(conversation.response) != 1:
                raise BadRow(f"has {len(conversation.response)} responses, not one")
        except BadRow as exc:
            dropped[str(exc)] += 1
            first.setdefault(str(exc), number)
            continue
        kept.append(conversation)
    if dropped:
        reasons = "; ".join(f"{n} {reason} (first: row {first[reason]})" for reason, n in dropped.items())
        total = sum(dropped.values())
        log.warning("dataset '%s': dropped %d of %d rows: %s", name, total, len(rows), reasons)
    return kept

