"""Read a registered dataset's rows, lazily, from its file or folder (JSON, JSON lines, CSV, Parquet,
text) or from the Hugging Face Hub.

A ``.json`` file may hold a JSON list of rows, one JSON object, or JSON lines, and so may a ``.jsonl``
file (as with the ``datasets`` library LLaMA-Factory 0.5 used). A ``.txt`` file gives one row ``{"text": line}``
per line. Text is UTF-8, or UTF-16/UTF-32 with a byte-order mark.

Line-based files (JSON lines, CSV, text) are read line by line: a line that is not UTF-8 or not valid
JSON, nested too deeply for Python's JSON reader, or longer than ``MAX_LINE_BYTES`` yields an
``Unreadable`` in its place, to be counted and skipped (a long line is skipped without being held in
memory); a file with no readable line at all is an error. A JSON document (a list or a pretty-printed
object) is read whole, and must be valid; with ``--streaming``, which promises bounded memory, one larger
than ``MAX_LINE_BYTES`` is refused.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chipspan.data.formats import MAX_ROW_CHARS
from chipspan.data.registry import DatasetEntry
from chipspan.errors import ChipspanError

log = logging.getLogger(__name__)

SUFFIXES = ("json", "jsonl", "csv", "parquet", "txt")
PARQUET_BATCH_ROWS = 1024  # rows decoded from a Parquet file at a time
# A line longer than this holds a row longer than formats.MAX_ROW_CHARS (8 bytes a character leave
# room for UTF-8 and JSON escapes), so it is skipped unread.
MAX_LINE_BYTES = 8 * MAX_ROW_CHARS

_LF05_DATA = "LLaMA-Factory's data/ folder at commit b988ce0 (github.com/hiyouga/LLaMA-Factory)"
# What the best-known files of LLaMA-Factory 0.5's registry are and where they come from, for the missing-file message.
DESCRIPTIONS = {
    "alpaca_data_en_52k.json": "Stanford Alpaca's 52,002 English instruction rows (CC BY-NC 4.0, "
    "github.com/tatsu-lab/stanford_alpaca)",
    "alpaca_data_zh_51k.json": "about 51k Chinese Alpaca instruction rows (github.com/ymcui/Chinese-LLaMA-Alpaca)",
    "alpaca_gpt4_data_en.json": "52,002 English Alpaca instructions answered by GPT-4 (CC BY-NC 4.0, "
    "the GPT-4-LLM project, github.com/Instruction-Tuning-with-GPT-4/GPT-4-LLM)",
    "alpaca_gpt4_data_zh.json": "48,818 Chinese Alpaca instructions answered by GPT-4, 35 MB (CC BY-NC 4.0, "
    "the GPT-4-LLM project, github.com/Instruction-Tuning-with-GPT-4/GPT-4-LLM)",
    "self_cognition.json": "LLaMA-Factory's self-identity rows with <NAME>/<AUTHOR> placeholders to fill in",
    "oaast_sft.json": "OpenAssistant oasst1 conversations as alpaca rows with history (Apache-2.0)",
    "oaast_sft_zh.json": "689 Chinese OpenAssistant oasst1 conversations as alpaca rows with history (Apache-2.0)",
    "lima.json": "LIMA's 1,000 curated conversations as alpaca rows with history (huggingface.co/datasets/GAIR/lima)",
    "c4_demo.json": "a small sample of C4 web text for pre-training demos (ODC-BY)",
    "wiki_demo.txt": "a small sample of Wikipedia text for pre-training demos",
}


@dataclass(frozen=True)
class Unreadable:
    """A line of a file that gives no row; ``reason`` says why in a few words."""

    reason: str


NOT_UTF8 = Unreadable("line is not UTF-8 text")
NOT_JSON = Unreadable("line is not valid JSON")
TOO_DEEP = Unreadable("line is JSON nested too deeply")
TOO_LONG = Unreadable(f"line is longer than {MAX_LINE_BYTES:,} bytes")
# JSON may escape half of a surrogate pair (\ud800-\udfff) alone: such text cannot be tokenized.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
NOT_UNICODE = Unreadable("text holds a lone surrogate escape (\\udXXX), not Unicode")
# Byte-order marks, longest first (the UTF-32-LE mark begins with the UTF-16-LE one).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_HUB_OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def dataset_files(entry: DatasetEntry, dataset_dir: str | Path) -> list[Path]:
    """The files holding ``entry``'s rows (sorted, for a folder); empty for a Hub dataset.

    Checks, without reading any row, that the data can be read: the files exist and are of one
    known type, or the ``datasets`` library is there and may go online.
    """
    if entry.hf_hub_url:
        _check_hub(entry)
        return []
    path = Path(dataset_dir).absolute() / entry.file_name
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        kinds = {_kind(p) for p in files}
        if len(kinds) != 1:
            raise ChipspanError(f"dataset '{entry.name}': {path} must hold files of one type ({', '.join(SUFFIXES)})")
    elif path.is_file():
        _kind(path)
        files = [path]
    else:
        raise ChipspanError(_missing(entry, path))
    for file in files:
        _check_readable(file)
    return files


def _check_readable(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ChipspanError(f"{path} cannot be read ({exc.strerror or exc}): check its permissions") from exc


def iter_rows(entry: DatasetEntry, files: list[Path], streaming: bool = False) -> Iterator[tuple[str, object]]:
    """``(place, row)`` for each row of ``entry``, in order; ``row`` is an ``Unreadable`` for a bad line.

    ``place`` says where the row is: ``"row 3"``, ``"line 3"``, or with the file name for a folder.
    ``files`` come from :func:`dataset_files`. Nothing is read before the first row is asked for.
    """
    if entry.hf_hub_url:
        yield from _hub_rows(entry, streaming)
        return
    if entry.file_sha1 and len(files) == 1:
        _check_sha1(files[0], entry.file_sha1)
    for file in files:
        prefix = f"{file.name} " if len(files) > 1 else ""
        for place, row in _file_rows(file, streaming):
            yield prefix + place, row


def fingerprint(files: list[Path]) -> str:
    """SHA-256 over the files' names and contents."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        _update(digest, file)
    return digest.hexdigest()


def _missing(entry: DatasetEntry, path: Path) -> str:
    message = f"dataset '{entry.name}': file {entry.file_name} not found (looked for {path})"
    description = DESCRIPTIONS.get(entry.file_name) if entry.builtin else None
    if description:
        message += f"; it is {description}, shipped in {_LF05_DATA}"
    return message + "; put it there or point --dataset_dir at the folder that holds it"


def _kind(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in SUFFIXES:
        known = ", ".join("." + s for s in SUFFIXES)
        raise ChipspanError(f"{path}: cannot read .{suffix} files; use one of {known}")
    return suffix


def _update(digest, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)


def _check_sha1(path: Path, expected: str) -> None:
    """Warn (one line, as LLaMA-Factory 0.5 did) when the file is not the one the registry describes."""
    digest = hashlib.sha1()
    _update(digest, path)
    if digest.hexdigest() != expected:
        log.warning(
            "%s: SHA-1 %s does not match file_sha1 %s in dataset_info.json; using the file anyway",
            path,
            digest.hexdigest(),
            expected,
        )


# ---- files -----------------------------------------------------------------------------------------


def _file_rows(path: Path, streaming: bool = False) -> Iterator[tuple[str, object]]:
    kind = _kind(path)
    if kind == "parquet":
        yield from ((f"row {i}", row) for i, row in enumerate(_parquet_rows(path), 1))
    elif kind == "txt":
        yield from _checked(
            path, ((f"line {n}", {"text": line} if isinstance(line, str) else line) for n, line in _text_lines(path))
        )
    elif kind == "csv":
        yield from _checked(path, _csv_rows(path))
    elif _is_document(path):
        yield from _document_rows(path, streaming)
    else:
        yield from _checked(path, _json_lines(path))


def _parquet_rows(path: Path) -> Iterator[dict]:
    """The file's rows, read one row group batch at a time (a file larger than memory streams)."""
    try:
        import pyarrow.parquet
    except ImportError as exc:
        raise ChipspanError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from exc
    try:
        for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            yield from batch.to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise ChipspanError(
            f"{path} is not a readable Parquet file ({' '.join(str(exc).split())[:200]}): re-save it"
        ) from exc


def _checked(path: Path, rows: Iterator[tuple[str, object]]) -> Iterator[tuple[str, object]]:
    """``rows``, and an error at the end if not one of them could be read (the file is not text rows)."""
    good, bad = 0, None
    for place, row in rows:
        if isinstance(row, Unreadable):
            bad = bad or (place, row.reason)
        else:
            good += 1
        yield place, row
    if not good and bad:
        hint = " (it holds NUL bytes: UTF-16 without a byte-order mark?)" if _has_nul(path) else ""
        raise ChipspanError(
            f"{path} has no readable row: its first bad {bad[0]} {bad[1].removeprefix('line ')}{hint}; "
            f"save it as UTF-8 {_FORMATS[_kind(path)]}"
        )


_FORMATS = {
    "json": "JSON lines or a JSON list",
    "jsonl": "JSON lines (one object per line)",
    "csv": "CSV with a header line",
    "txt": "text",
}


def _has_nul(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(1 << 16)


def _sniff(head: bytes) -> tuple[str, int]:
    """The encoding a file's first bytes announce, and the length of its byte-order mark."""
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding, len(bom)
    return "utf-8", 0


def _text_lines(path: Path) -> Iterator[tuple[int, str | Unreadable]]:
    """``(line number, text)`` for each line, without the line break; ``NOT_UTF8`` for a bad line and
    ``TOO_LONG`` for one longer than ``MAX_LINE_BYTES`` (characters, in UTF-16/32)."""
    with open(path, "rb") as f:
        encoding, bom = _sniff(f.read(4))
        f.seek(bom)
        if encoding == "utf-8":
            for number, raw in enumerate(_bounded_lines(f, b"\n"), 1):
                try:
                    yield number, raw if raw is TOO_LONG else raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    yield number, NOT_UTF8
            return
        try:  # a UTF-16/32 file cannot be split into lines before decoding
            lines = _bounded_lines(io.TextIOWrapper(f, encoding=encoding), "\n")
            for number, line in enumerate(lines, 1):
                yield number, line if line is TOO_LONG else line.rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise ChipspanError(
                f"{path} starts with a {encoding} byte-order mark but is not {encoding} text "
                f"({exc.reason}): re-save it as UTF-8"
            ) from exc


def _bounded_lines(f, newline):
    """The lines of ``f`` (bytes or text), each at most ``MAX_LINE_BYTES`` long: a longer one is read
    past in pieces and yields ``TOO_LONG``."""
    while line := f.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES or line.endswith(newline):
            yield line
            continue
        while (rest := f.readline(1 << 20)) and not rest.endswith(newline):
            pass
        yield TOO_LONG


def _csv_rows(path: Path) -> Iterator[tuple[str, object]]:
    """Rows of a CSV file with a header line; unreadable lines are skipped and reported."""
    skipped: list[tuple[int, Unreadable]] = []
    last = [0]  # the number of the last line the reader took

    def good_lines() -> Iterator[str]:
        for number, line in _text_lines(path):
            if isinstance(line, Unreadable):
                skipped.append((number, line))
            else:
                last[0] = number
                yield line + "\n"

    # Python's csv refuses fields past 131,072 characters; lines are bounded already, so allow what they hold.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))
    try:
        for row in csv.DictReader(good_lines()):
            while skipped:
                number, why = skipped.pop(0)
                yield f"line {number}", why
            yield f"line {last[0]}", row
    except csv.Error as exc:
        raise ChipspanError(f"{path} line {last[0]} is not valid CSV ({exc}): fix the line") from exc
    for number, why in skipped:
        yield f"line {number}", why


def _json_lines(path: Path) -> Iterator[tuple[str, object]]:
    for number, line in _text_lines(path):
        if isinstance(line, Unreadable):
            yield f"line {number}", line
        elif line.strip():
            try:
                yield f"line {number}", _unicode_checked(json.loads(line), _SURROGATE_ESCAPE.search(line))
            except ValueError:
                yield f"line {number}", NOT_JSON
            except RecursionError:
                yield f"line {number}", TOO_DEEP


def _first_line(path: Path) -> str:
    """The first line that is readable and not blank ("" when there is none)."""
    for _, line in _text_lines(path):
        if isinstance(line, str) and line.strip():
            return line.strip()
    return ""


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except (ValueError, RecursionError):
        return False
    return True


def _first_character(path: Path) -> str:
    """The file's first character that is not white space, from its first 64 kB ("" when none)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    encoding, bom = _sniff(head[:4])
    return head[bom:].decode(encoding, errors="ignore").lstrip()[:1]


def _is_document(path: Path) -> bool:
    """Whether a JSON file may be one JSON document (a list, or an object over several lines), not
    JSON lines: it starts with ``[``, or with ``{`` on a line that is not JSON by itself."""
    start = _first_character(path)
    return start == "[" or start == "{" and not _parses(_first_line(path))


def _document_rows(path: Path, streaming: bool = False) -> Iterator[tuple[str, object]]:
    """The rows of a file holding one JSON document: a list of rows, or one row.

    A file that does not parse whole is read as JSON lines (bad lines skipped) when its first line
    is JSON by itself or starts an object; otherwise it is a broken document, and one error says
    where it breaks.
    """
    if streaming and path.stat().st_size > MAX_LINE_BYTES:
        raise ChipspanError(
            f"{path} is one JSON document of {path.stat().st_size:,} bytes, which must be read "
            "whole: --streaming reads JSON lines, so write one row per line"
        )
    data = path.read_bytes()
    encoding, bom = _sniff(data[:4])
    try:
        text = data[bom:].decode(encoding)
        document = json.loads(text)
    except RecursionError as exc:
        raise ChipspanError(f"{path} is JSON nested deeper than Python's JSON reader allows: fix the file") from exc
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        first = _first_line(path)
        if first.startswith("{") or _parses(first):
            yield from _checked(path, _json_lines(path))
            return
        if isinstance(exc, UnicodeDecodeError):
            line = data.count(b"\n", 0, exc.start) + 1
            raise ChipspanError(
                f"{path} is not {encoding} text ({exc.reason} on line {line}): re-save it as UTF-8"
            ) from exc
        raise ChipspanError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): fix it, "
            "or write one row per line (JSON lines), so that bad lines are skipped"
        ) from exc
    rows = document if isinstance(document, list) else [document]
    escapes = _SURROGATE_ESCAPE.search(text)
    for number, row in enumerate(rows, 1):
        yield f"row {number}", _unicode_checked(row, escapes)


def _unicode_checked(row: object, escapes: object) -> object:
    """``row``, or ``NOT_UNICODE`` when its text has a lone surrogate; only ``escapes`` of surrogates
    in the JSON text can make one."""
    if escapes:
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return NOT_UNICODE
        except RecursionError:
            return TOO_DEEP
    return row


# ---- the Hugging Face Hub ------------------------------------------------------------------------------


def _check_hub(entry: DatasetEntry) -> None:
    """Fail early, with what to do, when a Hub dataset cannot be loaded here."""
    instead = f"or download it and register the file with file_name in {entry.name}'s dataset_info.json entry"
    offline = [name for name in _HUB_OFFLINE if os.environ.get(name, "").lower() in ("1", "true", "yes")]
    if offline:
        raise ChipspanError(
            f"dataset '{entry.name}' is on the Hugging Face Hub ({entry.hf_hub_url}) but {offline[0]} is set: "
            f"unset it to download, {instead}"
        )
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise ChipspanError(
            f"dataset '{entry.name}' is on the Hugging Face Hub ({entry.hf_hub_url}); reading it needs the "
            f"datasets library: pip install datasets, {instead}"
        ) from None


def _hub_rows(entry: DatasetEntry, streaming: bool) -> Iterator[tuple[str, object]]:
    import datasets

    try:
        rows = datasets.load_dataset(entry.hf_hub_url, name=entry.subset, split=entry.split, streaming=streaming)
    except Exception as exc:  # the library raises many kinds: network, auth, missing split, ...
        reason = " ".join(str(exc).split())[:200]
        raise ChipspanError(
            f"dataset '{entry.name}' could not be loaded from the Hugging Face Hub ({entry.hf_hub_url}: "
            f"{type(exc).__name__}: {reason}); check the network and the name, or download it and "
            "register the file with file_name"
        ) from exc
    for number, row in enumerate(rows, 1):
        yield f"row {number}", row
