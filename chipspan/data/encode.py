"""Conversations and texts -> token ids and labels: SFT masking and truncation, PT blocks.

SFT (as at the seed commit): a conversation is a list of (prompt, answer) pairs, one per assistant
turn. Prompt tokens get label -100; answer tokens (with the template's EOS) are trained, in every
turn. Pairs are cut to fit ``cutoff_len`` by the template revision's rule, the earliest pair first.

PT: texts + EOS each, concatenated, cut into ``cutoff_len`` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

from chipspan.data.formats import Conversation
from chipspan.data.templates import Special, Template

if TYPE_CHECKING:
    from chipspan.models.tokenizer import Tokenizer

IGNORE_INDEX = -100
# Rows encoded together. The seed ran its preprocessing through ``datasets.map(batched=True)``,
# whose 1,000-row batches PT blocks never cross: the remainder of every batch is dropped.
CHUNK_ROWS = 1000


@dataclass
class Example:
    """One training sequence: ``input_ids`` and ``labels`` of equal length, -100 = not trained."""

    input_ids: list[int]
    labels: list[int]


def encode_supervised(
    conversations: list[Conversation], template: Template, tokenizer: Tokenizer, cutoff_len: int
) -> list[Example]:
    """One example per conversation; each must have exactly one response."""
    truncate = _TRUNCATION[template.revision]
    examples = []
    for start in range(0, len(conversations), CHUNK_ROWS):
        chunk = conversations[start : start + CHUNK_ROWS]
        rendered = [template.render([*c.prompt, ("assistant", c.response[0])], c.system) for c in chunk]
        for messages in _tokenize(rendered, template, tokenizer):
            input_ids, labels = [], []
            total = 0
            for source, target in zip(messages[::2], messages[1::2]):
                if total >= cutoff_len:
                    break
                source_stop, target_stop = truncate(len(source), len(target), cutoff_len - total)
                source, target = source[:source_stop], target[:target_stop]
                total += len(source) + len(target)
                input_ids += source + target
                labels += [IGNORE_INDEX] * len(source) + target
            examples.append(Example(input_ids, labels))
    return examples


def encode_pretrain(texts: list[str], tokenizer: Tokenizer, cutoff_len: int) -> list[Example]:
    """Blocks of ``cutoff_len`` tokens from the texts, each followed by EOS (no BOS), as the seed did.

    Blocks are cut within each run of ``CHUNK_ROWS`` texts and the remainder dropped. Labels are the
    ids, EOS included. (The seed's collator masked every pad id, which is EOS when the tokenizer has
    no pad token, so its models never learned where a text ends; we train on EOS.)
    """
    eos = tokenizer.eos_token_id
    examples = []
    for start in range(0, len(texts), CHUNK_ROWS):
        encoded = tokenizer.encode_batch(texts[start : start + CHUNK_ROWS])
        ids = list(chain.from_iterable(t + [eos] for t in encoded))
        for i in range(0, len(ids) // cutoff_len * cutoff_len, cutoff_len):
            block = ids[i : i + cutoff_len]
            examples.append(Example(block, list(block)))
    return examples


def _tokenize(rendered: list[list[list]], template: Template, tokenizer: Tokenizer) -> list[list[list[int]]]:
    """Token ids of every message: each string piece encoded on its own, special slots as their ids.

    Distinct strings are encoded once, in one batch.
    """
    pieces = (p for conv in rendered for msg in conv for p in msg)
    texts = list(dict.fromkeys(p for p in pieces if isinstance(p, str) and p))
    ids_of = dict(zip(texts, tokenizer.encode_batch(texts)))
    specials = {}
    out = []
    for conv in rendered:
        encoded = []
        for msg in conv:
            ids: list[int] = []
            for piece in msg:
                if isinstance(piece, Special):
                    if piece not in specials:
                        specials[piece] = template.special_id(piece, tokenizer)
                    if specials[piece] is not None:
                        ids.append(specials[piece])
                elif piece:
                    ids += ids_of[piece]
            encoded.append(ids)
        out.append(encoded)
    return out


def _seed_truncation(source_len: int, target_len: int, remaining: int) -> tuple[int, int]:
    """Slice stops for one pair at the seed commit (``infer_max_len``, 16 tokens kept for the answer).

    The answer gets its share of ``remaining``, at least 16; the prompt gets the rest. When fewer
    than 16 tokens remain, the seed's prompt stop goes negative and, as a Python slice, may keep
    most of the prompt: the seed's examples then grew past ``cutoff_len`` (4 of 689 oaast_sft_zh
    rows at 1024). Only in that case do we differ: the answer takes what remains (the prompt the
    rest), so no example is longer than ``cutoff_len``.
    """
    target_stop = max(int(remaining * (target_len / (source_len + target_len))), 16)
    source_stop = remaining - target_stop
    if len(range(source_len)[:source_stop]) + min(target_len, target_stop) <= remaining:
        return source_stop, target_stop
    target_stop = min(target_len, remaining)
    return remaining - target_stop, target_stop


def _lf09_truncation(source_len: int, target_len: int, remaining: int) -> tuple[int, int]:
    """Slice stops for one pair in LLaMA-Factory 0.9 (``infer_seqlen``): never past ``remaining``."""
    if target_len * 2 < remaining:
        max_target = remaining
    elif source_len * 2 < remaining:
        max_target = remaining - source_len
    else:
        max_target = int(remaining * (target_len / (source_len + target_len)))
    target = min(max_target, target_len)
    return min(max(remaining - target, 0), source_len), target


_TRUNCATION = {"seed": _seed_truncation, "lf-0.9": _lf09_truncation}
