"""Conversations and texts -> token ids and labels: SFT masking and truncation, PT blocks.

SFT: a conversation is a list of (prompt, answer) pairs, one per assistant-side turn. Prompt tokens get
label -100 (unless ``train_on_prompt``); answer tokens (with the template's EOS) are trained, in every
turn (only the last with ``mask_history``). Pairs are cut to fit ``cutoff_len`` by the template
revision's rule (LLaMA-Factory 0.5's or LLaMA-Factory 0.9's), the earliest pair first (the last first with
``mask_history``). ``--template auto`` tokenizes the chat template's text once and finds the pairs by
character offsets.

PT: texts + EOS each, concatenated, cut into ``cutoff_len`` blocks.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

from chipspan.data.formats import Conversation
from chipspan.data.template_auto import ChatTemplate
from chipspan.data.templates import Special, Template, Token
from chipspan.errors import ChipspanError

if TYPE_CHECKING:
    from chipspan.models.tokenizer import Tokenizer

IGNORE_INDEX = -100
# Rows encoded together. LLaMA-Factory 0.5 ran its preprocessing through ``datasets.map(batched=True)``,
# whose 1,000-row batches PT blocks never cross: the remainder of every batch is dropped.
CHUNK_ROWS = 1000


@dataclass
class Example:
    """One training sequence: ``input_ids`` and ``labels`` of equal length, -100 = not trained."""

    input_ids: list[int]
    labels: list[int]


def encode_supervised(
    conversations: list[Conversation],
    template: Template | ChatTemplate,
    tokenizer: Tokenizer,
    cutoff_len: int,
    *,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> list[Example]:
    """One example per conversation; each must have exactly one response.

    ``train_on_prompt``: prompt tokens are trained too. ``mask_history`` (lf-0.9 and ``auto``): only the
    last answer is trained, and when the conversation is too long the latest turns are kept.
    """
    if isinstance(template, ChatTemplate):
        return _encode_with_chat_template(conversations, template, tokenizer, cutoff_len, train_on_prompt, mask_history)
    check_options(template, train_on_prompt, mask_history)
    eos = tokenizer.eos_token_id
    examples = []
    for start in range(0, len(conversations), CHUNK_ROWS):
        chunk = conversations[start : start + CHUNK_ROWS]
        rendered = [template.render(c.messages(), c.system, c.tools, mask_history=mask_history) for c in chunk]
        for messages in _tokenize(rendered, template, tokenizer):
            pairs = list(zip(messages[::2], messages[1::2]))
            if template.revision == "lf-0.5":
                example = _join_lf05(pairs, template.efficient_eos, eos, cutoff_len, train_on_prompt)
            else:
                example = _join_lf09(pairs, template.efficient_eos, eos, cutoff_len, train_on_prompt, mask_history)
            examples.append(example)
    return examples


def _encode_with_chat_template(
    conversations: list[Conversation],
    template: ChatTemplate,
    tokenizer: Tokenizer,
    cutoff_len: int,
    train_on_prompt: bool,
    mask_history: bool,
) -> list[Example]:
    """``--template auto``: each conversation's text tokenized once; a token is an answer token when it
    starts inside an answer's span. Pairs (text before an answer, the answer) are cut by lf-0.9's rule."""
    examples = []
    for start in range(0, len(conversations), CHUNK_ROWS):
        chunk = conversations[start : start + CHUNK_ROWS]
        rendered = [template.render_spans(c.messages(), c.system, c.tools) for c in chunk]
        encodings = tokenizer.backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
        for (_, spans), encoding in zip(rendered, encodings):
            starts = [offset[0] for offset in encoding.offsets]
            pairs, done = [], 0
            for answer_start, answer_end in spans:
                first = bisect_left(starts, answer_start)
                stop = bisect_left(starts, answer_end)
                pairs.append((encoding.ids[done:first], encoding.ids[first:stop]))
                done = stop
            eos = tokenizer.eos_token_id
            examples.append(_join_lf09(pairs, False, eos, cutoff_len, train_on_prompt, mask_history))
    return examples


def check_options(template: Template | ChatTemplate, train_on_prompt: bool, mask_history: bool) -> None:
    """Refuse the options a template's revision cannot honour (callers may check before reading data)."""
    if mask_history and template.revision == "lf-0.5":
        raise ChipspanError("--mask_history needs --template_revision lf-0.9: LLaMA-Factory 0.5 trained every answer")
    if train_on_prompt and template.efficient_eos and template.revision != "lf-0.5":
        raise ChipspanError(
            f"template '{template.name}' (lf-0.9) cannot train on the prompt: it ends turns with an EOS "
            "label in the next prompt; drop --train_on_prompt or use --template_revision lf-0.5"
        )


def _source_labels(source: list[int], turn: int, efficient_eos: bool, eos: int, train_on_prompt: bool) -> list[int]:
    """Labels of one prompt: the ids when trained; with efficient_eos a later prompt's first label is the
    EOS that ends the answer before it (the prompt's first token stands where that EOS would be)."""
    if train_on_prompt:
        return list(source)
    if efficient_eos and turn != 0 and source:
        return [eos] + [IGNORE_INDEX] * (len(source) - 1)
    return [IGNORE_INDEX] * len(source)


def _join_lf05(pairs: list, efficient_eos: bool, eos: int, cutoff_len: int, train_on_prompt: bool) -> Example:
    """LLaMA-Factory 0.5's sequence: pairs in order, each cut by its rule, EOS appended with efficient_eos
    (after the cut, so such an example may be ``cutoff_len + 1`` long, as in LLaMA-Factory 0.5)."""
    input_ids, labels = [], []
    total = 0
    for turn, (source, target) in enumerate(pairs):
        if total >= cutoff_len:
            break
        source_stop, target_stop = _lf05_truncation(len(source), len(target), cutoff_len - total)
        source, target = source[:source_stop], target[:target_stop]
        total += len(source) + len(target)
        input_ids += source + target
        labels += _source_labels(source, turn, efficient_eos, eos, train_on_prompt) + target
    if efficient_eos:
        input_ids.append(eos)
        labels.append(eos)
    return Example(input_ids, labels)


def _join_lf09(
    pairs: list, efficient_eos: bool, eos: int, cutoff_len: int, train_on_prompt: bool, mask_history: bool
) -> Example:
    """LLaMA-Factory 0.9's sequence: the final EOS of efficient_eos counted in the budget; with
    ``mask_history`` the pairs are cut last-first (the last one trained, the others not) and kept in order."""
    input_ids, labels = [], []
    total = 1 if efficient_eos else 0
    ordered = pairs[::-1] if mask_history else pairs
    for turn, (source, target) in enumerate(ordered):
        if total >= cutoff_len:
            break
        source_len, target_len = _lf09_truncation(len(source), len(target), cutoff_len - total)
        source, target = source[:source_len], target[:target_len]
        total += source_len + target_len
        source_labels = _source_labels(source, turn, efficient_eos, eos, train_on_prompt)
        target_labels = [IGNORE_INDEX] * target_len if mask_history and turn != 0 else target
        if mask_history:
            input_ids = source + target + input_ids
            labels = source_labels + target_labels + labels
        else:
            input_ids += source + target
            labels += source_labels + target_labels
    if efficient_eos:
        input_ids.append(eos)
        labels.append(eos)
    return Example(input_ids, labels)


def last_answer(example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the answer is the last run of trained tokens, the prompt all before it."""
    trained = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    if not trained:
        return list(example.input_ids), []
    end = start = trained[-1]
    while start > 0 and example.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(example.input_ids[:start]), list(example.input_ids[start : end + 1])


def encode_prompt(
    messages: list[tuple[str, str]],
    template: Template | ChatTemplate,
    tokenizer: Tokenizer,
    system: str = "",
    tools: str = "",
) -> list[int]:
    """The ids training puts before the next answer of ``messages`` (``(role, content)``, alternating
    as in :class:`Conversation`, ending on the user side): what a chat with the trained model sends
    it, token for token, untruncated."""
    with_answer = [*messages, ("assistant", "")]
    if isinstance(template, ChatTemplate):
        text, spans = template.render_spans(with_answer, system, tools)
        encoding = tokenizer.backend.encode(text, add_special_tokens=False)
        return encoding.ids[: bisect_left([offset[0] for offset in encoding.offsets], spans[-1][0])]
    rendered = template.render(with_answer, system, tools)
    return list(chain.from_iterable(_tokenize([rendered], template, tokenizer)[0][:-1]))


def encode_pretrain(texts: list[str], tokenizer: Tokenizer, cutoff_len: int) -> list[Example]:
    """Blocks of ``cutoff_len`` tokens from the texts, each followed by EOS (no BOS), as LLaMA-Factory 0.5 did.

    Blocks are cut within each run of ``CHUNK_ROWS`` texts and the remainder dropped. Labels are the
    ids, EOS included. (LLaMA-Factory 0.5's collator masked every pad id, which is EOS when the tokenizer has
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
                if isinstance(piece, (Special, Token)):
                    if piece not in specials:
                        specials[piece] = template.special_id(piece, tokenizer)
                    if specials[piece] is not None:
                        ids.append(specials[piece])
                elif piece:
                    ids += ids_of[piece]
            encoded.append(ids)
        out.append(encoded)
    return out


def _lf05_truncation(source_len: int, target_len: int, remaining: int) -> tuple[int, int]:
    """Slice stops for one pair in LLaMA-Factory 0.5 (``infer_max_len``, 16 tokens kept for the answer).

    The answer gets its share of ``remaining``, at least 16; the prompt gets the rest. When fewer
    than 16 tokens remain, LLaMA-Factory 0.5's prompt stop goes negative and, as a Python slice, may keep
    most of the prompt: LLaMA-Factory 0.5's examples then grew past ``cutoff_len`` (4 of 689 oaast_sft_zh
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


_TRUNCATION = {"lf-0.5": _lf05_truncation, "lf-0.9": _lf09_truncation}
