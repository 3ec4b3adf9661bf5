"""The data entry point: dataset names -> encoded train and eval examples, with statistics.

    check the flags -> find the files -> (cache hit: done) -> read rows -> convert (bad rows counted)
    -> mix the datasets -> split off eval rows -> encode chunk by chunk -> drop rows with nothing
    to train on -> cache

As in LLaMA-Factory 0.9.5, ``val_size`` splits rows before they are encoded: without streaming by a
permutation drawn from ``seed`` (``datasets``' ``train_test_split``: the first ``n_eval`` rows of the
permutation are eval, the rest train, in that order); with streaming, after a buffered shuffle, the
first ``val_size`` rows. Rows that cannot be used are dropped before mixing and counted by reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from chipspan.args import DataArguments
from chipspan.data import cache, mixing, registry, sources
from chipspan.data.encode import CHUNK_ROWS, check_options, encode_pretrain, encode_supervised
from chipspan.data.examples import EncodedExamples
from chipspan.data.formats import TEXT_ONLY, BadRow, Conversation, converter, media_column
from chipspan.data.stats import DataStats
from chipspan.data.template_auto import ChatTemplate
from chipspan.data.templates import Template, fix_tokenizer, revision_notice, run_template
from chipspan.errors import ChipspanError, shown

if TYPE_CHECKING:
    from chipspan.data.encode import Example
    from chipspan.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

NOTHING_TO_TRAIN = "has no tokens to train on"
# A cut by the 0.5 rule keeps at least this many answer tokens, so a cut example is at most this much
# shorter than cutoff_len: only those are re-encoded whole to count truncations.
_MIN_CUT_LENGTH = 16
# Flags that do not change the examples, left out of the cache key.
_NOT_IN_KEY = ("dataset_dir", "overwrite_cache", "preprocessing_num_workers")
# SFT rows are encoded (tokenized at once) in chunks of at most this many characters, or CHUNK_ROWS rows:
# 1,000 rows near formats.MAX_ROW_CHARS would be gigabytes of tokens. (PT keeps LLaMA-Factory 0.5's 1,000-row runs.)
CHUNK_CHARS = 16_000_000

Row = tuple[str, Conversation]  # (where it came from, the conversation)


@dataclass
class DataSplit:
    """Encoded ``train`` and ``eval`` examples (``eval`` is empty without ``val_size``) and the load's ``stats``;
    ``note`` says how they were made when a user may not expect it (which LLaMA-Factory's template, when
    the two revisions differ; read from ``tokenized_path``)."""

    train: EncodedExamples
    eval: EncodedExamples
    stats: DataStats
    note: str | None = None

    def summary(self) -> str:
        """What a run prints about its data: the note, then the counts."""
        return (f"note: {self.note}\n" if self.note else "") + self.stats.summary()


# The examples file chipspan keeps in a --tokenized_path folder (LLaMA-Factory keeps a datasets folder).
TOKENIZED_FILE = "chipspan_examples.npz"


def load_dataset_split(
    data: DataArguments, tokenizer: Tokenizer, stage: str = "sft", seed: int = 42, use_cache: bool = True
) -> DataSplit:
    """Encode ``data.dataset`` (comma-separated names) for ``stage`` and split off ``data.val_size`` rows,
    or, with ``data.eval_dataset`` (LLaMA-Factory 0.9), evaluate on every row of those datasets instead.

    Every flag, name and file is checked before a row is read. The tokenizer is fixed for the
    template, as LLaMA-Factory 0.5 did (see ``fix_tokenizer``). With ``use_cache`` the examples are read from
    (or written to) the data cache unless ``data.overwrite_cache``; Hub datasets are not cached.
    """
    if data.tokenized_path is None:
        return _load_split(data, tokenizer, stage, seed, use_cache)
    saved = Path(data.tokenized_path) / TOKENIZED_FILE
    if saved.is_file():  # as LLaMA-Factory does: the saved examples, whatever the data settings say
        found = cache.load(saved, tokenizer.vocab_size)
        if found is None:
            raise ChipspanError(
                f"--tokenized_path {data.tokenized_path}: {TOKENIZED_FILE} is unreadable or holds ids this "
                "tokenizer lacks: name a new folder to encode the data again"
            )
        (splits, stats), note = (
            found,
            f"examples read from --tokenized_path {data.tokenized_path}; the data settings are not",
        )
        return DataSplit(splits["train"], splits["eval"], stats, note)
    _check_tokenized_path(Path(data.tokenized_path), data.streaming)
    split = _load_split(data, tokenizer, stage, seed, use_cache)
    cache.save(saved, {"train": split.train, "eval": split.eval}, split.stats)
    return split


def _check_tokenized_path(folder: Path, streaming: bool) -> None:
    """A --tokenized_path chipspan may write its examples into: new or empty, and not a stream."""
    if streaming:
        raise ChipspanError("--tokenized_path saves every example: turn --streaming off, or drop --tokenized_path")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ChipspanError(
            f"--tokenized_path {folder} holds something chipspan did not write (LLaMA-Factory saves a datasets "
            "folder there, which chipspan does not read): name a new folder"
        )


def _load_split(data: DataArguments, tokenizer: Tokenizer, stage: str, seed: int, use_cache: bool) -> DataSplit:
    """``data.dataset`` split by ``data.val_size``, or ``data.eval_dataset`` evaluated beside it."""
    note = revision_notice(data.template, data.template_revision)
    if data.eval_dataset is None:
        return dataclasses.replace(_load(data, tokenizer, stage, seed, use_cache), note=note)
    if data.val_size:
        raise ChipspanError("--val_size and --eval_dataset both choose the eval rows: keep one of them")
    evaluated = dataclasses.replace(data, dataset=data.eval_dataset)
    for checked in (data, evaluated) if data.dataset else (evaluated,):  # both before a row is read
        _check(checked, stage, tokenizer)
    held = _load(evaluated, tokenizer, stage, seed, use_cache)
    if data.dataset is None:
        return DataSplit(EncodedExamples.build([]), held.train, held.stats.as_eval(), note)
    trained = _load(data, tokenizer, stage, seed, use_cache)
    return DataSplit(trained.train, held.train, trained.stats.plus(held.stats.as_eval()), note)


def _load(data: DataArguments, tokenizer: Tokenizer, stage: str, seed: int, use_cache: bool) -> DataSplit:
    """``data.dataset`` encoded and split by ``data.val_size``, from the cache when it has them."""
    entries, files, template, probs = _check(data, stage, tokenizer)
    fix_tokenizer(tokenizer, template)
    path = None
    if use_cache and not any(entry.hf_hub_url for entry in entries):
        from chipspan.assets import resolve_cache_dir

        path = cache.cache_path(_key(data, entries, files, tokenizer, template, stage, seed), resolve_cache_dir())
    found = cache.load(path, tokenizer.vocab_size) if path and not data.overwrite_cache else None
    if found:
        splits, stats = found
    else:
        splits, stats = _build(data, entries, files, tokenizer, template, stage, seed, probs)
        if path:
            cache.save(path, splits, stats)
    log.info("%s", stats.summary())
    return DataSplit(splits["train"], splits["eval"], stats)


def load_examples(
    dataset: str,
    dataset_dir: str | Path,
    tokenizer: Tokenizer,
    template: str | None = "default",
    cutoff_len: int = 1024,
    stage: str = "sft",
    max_samples: int | None = None,
    template_revision: str = "lf-0.5",
) -> list[Example]:
    """The training examples of the comma-separated ``dataset`` names, concatenated in order, uncached.

    ``max_samples`` keeps the first N rows of each dataset. See :func:`load_dataset_split`.
    """
    data = DataArguments(
        dataset=dataset,
        dataset_dir=str(dataset_dir),
        template=template,
        cutoff_len=cutoff_len,
        max_samples=max_samples,
        template_revision=template_revision,
    )
    return list(load_dataset_split(data, tokenizer, stage, use_cache=False).train)


# ---- checks -------------------------------------------------------------------------------------------


def _check(
    data: DataArguments, stage: str, tokenizer: Tokenizer
) -> tuple[list[registry.DatasetEntry], list[list[Path]], Template | ChatTemplate | None, list | None]:
    """The entries, their files, the template and interleave probabilities; every flag is checked first."""
    if data.cutoff_len < 1:
        raise ChipspanError(f"cutoff_len must be at least 1, got {data.cutoff_len}")
    if data.max_samples is not None and data.max_samples < 1:
        raise ChipspanError(f"max_samples must be at least 1, got {data.max_samples}")
    _eval_rows(data.val_size, None, data.streaming)
    if data.streaming and data.buffer_size < 1:
        raise ChipspanError(f"buffer_size must be at least 1, got {data.buffer_size}")
    if data.dataset is None:
        raise ChipspanError("no dataset given: pass --dataset NAME (a name from dataset_info.json)")
    entries = registry.lookup(data.dataset, data.dataset_dir, stage)
    files = registry.each_checked(entries, lambda entry: sources.dataset_files(entry, data.dataset_dir))
    if stage == "sft" and data.template is None:
        raise ChipspanError("supervised fine-tuning needs a template: pass --template, e.g. default")
    template = None
    if data.template is not None:
        template = run_template(data, tokenizer)
        check_options(template, data.train_on_prompt, data.mask_history)
    probs = mixing.parse_probs(data.mix_strategy, data.interleave_probs, len(entries))
    return entries, files, template, probs


def _eval_rows(val_size: float, rows: int | None, streaming: bool) -> int:
    """How many rows ``val_size`` holds out of ``rows`` (None: only check the value)."""
    if val_size < 0 or not math.isfinite(val_size):
        raise ChipspanError(f"val_size must be a count (>= 1) or a fraction in (0, 1), got {val_size:g}")
    if val_size >= 1 and val_size != int(val_size):
        raise ChipspanError(f"val_size {val_size:g} is neither a whole count nor a fraction below 1")
    if streaming and 0 < val_size < 1:
        raise ChipspanError(
            f"with --streaming the number of rows is unknown: give val_size as a count, not the fraction {val_size:g}"
        )
    if rows is None or val_size == 0:
        return 0
    held = int(val_size) if val_size >= 1 else math.ceil(val_size * rows)
    if held >= rows:
        raise ChipspanError(
            f"val_size {val_size:g} leaves no training rows: the data has {rows} usable rows; lower val_size"
        )
    return held


# ---- the cache key -----------------------------------------------------------------------------------


def _key(data, entries, files, tokenizer, template, stage, seed) -> str:
    flags = {k: v for k, v in dataclasses.asdict(data).items() if k not in _NOT_IN_KEY}
    backend = hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()
    return cache.cache_key(
        {
            "datasets": [[dataclasses.asdict(e), sources.fingerprint(f)] for e, f in zip(entries, files)],
            "tokenizer": [backend, tokenizer.special_tokens, tokenizer.add_bos_token, tokenizer.add_eos_token],
            "template": _template_key(template),
            "stage": stage,
            "seed": seed,
            "flags": flags,
        }
    )


def _template_key(template: Template | ChatTemplate | None) -> str:
    """What of the template shapes the examples (a chat template: its text; the tokenizer is keyed apart)."""
    if isinstance(template, ChatTemplate):
        return repr(("auto", template.tokenizer.chat_template, template.default_system))
    return repr(template)


# ---- reading, mixing, splitting, encoding ------------------------------------------------------------


def _build(data, entries, files, tokenizer, template, stage, seed, probs):
    """Encoded ``{"train", "eval"}`` splits and statistics, from the files."""
    stats = DataStats()
    need_response = stage == "sft"
    revision = template.revision if template is not None else data.template_revision  # how rows are read
    readers = [_reader(e, f, data, stats, need_response, revision) for e, f in zip(entries, files)]
    if not data.streaming:  # read and convert each dataset once; restarts replay the list
        readers = [(lambda rows: lambda: rows)(list(read())) for read in readers]
    rows = mixing.mix(readers, data.mix_strategy, probs, seed)

    if data.streaming:
        rows = _buffer_shuffle(rows, data.buffer_size, seed)
        held = _eval_rows(data.val_size, math.inf, streaming=True)
        eval_rows, train_rows = list(itertools.islice(rows, held)), rows
    else:
        rows = list(rows)
        held = _eval_rows(data.val_size, len(rows), streaming=False) if rows else 0
        order = np.random.default_rng(seed).permutation(len(rows)) if held else range(len(rows))
        eval_rows, train_rows = [rows[i] for i in order[:held]], [rows[i] for i in order[held:]]

    encode = (
        _pretrain_encoder(tokenizer, data.cutoff_len)
        if stage == "pt"
        else _supervised_encoder(template, tokenizer, data, stats)
    )
    splits = {"train": encode(train_rows), "eval": encode(eval_rows)}
    if not stats.rows_kept:
        raise ChipspanError(_nothing_usable(data, stats))
    if not splits["train"] and splits["eval"]:
        raise ChipspanError(f"val_size {data.val_size:g} leaves no training rows: lower it")
    if not splits["train"]:
        what = f"no block of {data.cutoff_len} tokens" if stage == "pt" else "no usable rows"
        raise ChipspanError(f"dataset {data.dataset} gives {what}: check the files and columns in dataset_info.json")
    stats.train, stats.eval = len(splits["train"]), len(splits["eval"])
    stats.tokens = splits["train"].tokens + splits["eval"].tokens
    return splits, stats


def _reader(entry, files, data, stats: DataStats, need_response: bool, revision: str) -> Callable[[], Iterator[Row]]:
    """A function that reads ``entry``'s usable rows from the start; the first read counts them."""
    convert = converter(entry.formatting, entry.columns, entry.tags, revision)
    counted = [False]

    def read() -> Iterator[Row]:
        counting, counted[0] = not counted[0], True
        mine = DataStats()
        for place, row in itertools.islice(sources.iter_rows(entry, files, data.streaming), data.max_samples):
            if media := media_column(row, entry.columns):
                raise ChipspanError(f"dataset '{entry.name}' {place} has {media} ({shown(row[media])}): {TEXT_ONLY}")
            try:
                if isinstance(row, sources.Unreadable):
                    raise BadRow(row.reason)
                conversation = convert(row)
                if need_response and len(conversation.response) != 1:
                    raise BadRow(f"has {len(conversation.response)} responses, not one")
            except BadRow as exc:
                if counting:
                    mine.drop(str(exc), place)
                    stats.drop(str(exc), f"{entry.name} {place}")
                continue
            except Exception as exc:  # a converter bug must not stop the run: count it, and say so
                reason = f"malformed row ({type(exc).__name__}: {str(exc)[:80]})"
                if counting:
                    mine.drop(reason, place)
                    stats.drop(reason, f"{entry.name} {place}")
                continue
            if counting:
                mine.keep()
                stats.keep()
            yield f"{entry.name} {place}", conversation
        if counting and mine.dropped:
            log.warning(
                "dataset '%s': dropped %d of %d rows: %s",
                entry.name,
                mine.rows_dropped,
                mine.rows_read,
                mine.reasons(places=1),
            )

    return read


def _buffer_shuffle(rows: Iterable, size: int, seed: int) -> Iterator:
    """Rows in a shuffled order drawn from ``seed``, holding at most ``size`` rows at a time.

    The buffer fills first; then each new row takes the place of a random one, which is yielded.
    """
    rng = np.random.default_rng(seed)
    buffer: list = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = row
    rng.shuffle(buffer)
    yield from buffer


def _chunks(rows: Iterable[Row], max_chars: float = math.inf) -> Iterator[list[Row]]:
    """Runs of at most ``CHUNK_ROWS`` rows, cut sooner once they hold ``max_chars`` characters of text."""
    chunk, chars = [], 0
    for row in rows:
        chunk.append(row)
        chars += row[1].chars()
        if len(chunk) == CHUNK_ROWS or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _supervised_encoder(template, tokenizer, data: DataArguments, stats: DataStats):
    """A function: rows -> compact examples; rows with nothing to train on are dropped and counted."""
    options = {"train_on_prompt": data.train_on_prompt, "mask_history": data.mask_history}

    def encode(rows: Iterable[Row]) -> EncodedExamples:
        parts = []
        for chunk in _chunks(rows, CHUNK_CHARS):
            conversations = [c for _, c in chunk]
            part = EncodedExamples.build(
                encode_supervised(conversations, template, tokenizer, data.cutoff_len, **options)
            )
            stats.truncated += _truncated(part, conversations, template, tokenizer, data.cutoff_len, options)
            trained = part.trained()
            for i in np.flatnonzero(~trained):
                stats.unkeep(NOTHING_TO_TRAIN, chunk[i][0])
            parts.append(part if trained.all() else part.take(np.flatnonzero(trained)))
        return EncodedExamples.concat(parts)

    return encode


def _truncated(
    part: EncodedExamples, conversations: list[Conversation], template, tokenizer, cutoff_len: int, options: dict
) -> int:
    """How many examples were cut to ``cutoff_len``: the ones near it are encoded again, whole."""
    near = np.flatnonzero(part.lengths >= cutoff_len - _MIN_CUT_LENGTH)
    if not len(near):
        return 0
    whole = encode_supervised([conversations[i] for i in near], template, tokenizer, 2**62, **options)
    return sum(len(example.input_ids) > int(length) for example, length in zip(whole, part.lengths[near]))


def _pretrain_encoder(tokenizer, cutoff_len: int):
    """A function: rows -> blocks of ``cutoff_len`` tokens, cut within each chunk of rows (as LLaMA-Factory 0.5 did)."""

    def encode(rows: Iterable[Row]) -> EncodedExamples:
        blocks = (encode_pretrain([c.prompt[0][1] for _, c in chunk], tokenizer, cutoff_len) for chunk in _chunks(rows))
        return EncodedExamples.concat([EncodedExamples.build(chunk_blocks) for chunk_blocks in blocks])

    return encode


def _nothing_usable(data: DataArguments, stats: DataStats) -> str:
    if not stats.rows_read:
        return f"dataset {data.dataset} has no rows: the files are empty"
    hint = (
        f"--cutoff_len {data.cutoff_len} may leave no room for the answers (raise it), or "
        if NOTHING_TO_TRAIN in stats.dropped
        else ""
    )
    return (
        f"dataset {data.dataset} has no usable rows: all {stats.rows_read} were dropped: {stats.reasons()}; "
        f"{hint}check the files and the columns/tags in dataset_info.json"
    )
