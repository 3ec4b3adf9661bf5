"""Random malformed rows and lines (hypothesis): loading never crashes, and every row read is either
kept or dropped and counted under a reason."""

import json
import tempfile
from pathlib import Path

import pytest
from helpers import LLAMA2_TOKENIZER
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chipspan.args import DataArguments
from chipspan.data import sources
from chipspan.data.formats import BadRow, converter
from chipspan.data.loader import load_dataset_split
from chipspan.errors import ChipspanError
from chipspan.models.tokenizer import Tokenizer

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=6)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5,
)
text = st.text(max_size=12)
maybe_text = text | junk  # mostly text, sometimes anything


def rows_of(fields: dict) -> st.SearchStrategy:
    """Rows with any subset of ``fields``, or a row that is not an object at all."""
    return st.fixed_dictionaries({}, optional=fields) | junk


def messages(role_key, content_key, roles):
    message = st.fixed_dictionaries({}, optional={role_key: st.sampled_from(roles) | junk, content_key: maybe_text})
    return st.lists(message | junk, max_size=5) | junk


ALPACA = rows_of(
    {
        "instruction": maybe_text,
        "input": maybe_text,
        "output": maybe_text | st.lists(text, max_size=2),
        "system": maybe_text,
        "history": st.lists(st.lists(maybe_text, max_size=3), max_size=2) | junk,
    }
)
SHAREGPT = rows_of(
    {
        "conversations": messages("from", "value", ["human", "gpt", "system", "observation", "function_call", "bob"]),
        "system": maybe_text,
        "tools": maybe_text,
    }
)
OPENAI = rows_of({"messages": messages("role", "content", ["user", "assistant", "system", "tool", "bob"])})
ENTRIES = {
    "alpaca": {
        "columns": {
            "prompt": "instruction",
            "query": "input",
            "response": "output",
            "system": "system",
            "history": "history",
        }
    },
    "sharegpt": {
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system", "tools": "tools"},
    },
    "openai": {
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "observation_tag": "tool",
            "system_tag": "system",
        },
    },
}
BAD_LINES = [b"{oops", b"\xff\xfe\x00 not utf-8", b"[1,", b"", b"   "]

_tokenizer = None


def tokenizer():
    global _tokenizer
    _tokenizer = _tokenizer or Tokenizer.from_folder(LLAMA2_TOKENIZER)
    return _tokenizer


def lines_of(rows):
    """JSON lines, with bad lines (and blank ones) mixed in."""
    return st.lists(
        st.one_of(rows.map(lambda r: json.dumps(r).encode()), st.sampled_from(BAD_LINES)), min_size=1, max_size=12
    )


def check_load(formatting: str, lines: list[bytes]):
    """Load ``lines`` as a dataset of ``formatting`` and check the counts; returns the stats (None: an error)."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "toy.jsonl").write_bytes(b"\n".join(lines))
        entry = {"file_name": "toy.jsonl", **ENTRIES[formatting]}
        (Path(folder) / "dataset_info.json").write_text(json.dumps({"toy": entry}))
        data = DataArguments(dataset="toy", dataset_dir=folder, template="default", cutoff_len=64)
        try:
            split = load_dataset_split(data, tokenizer(), use_cache=False)
        except ChipspanError as exc:  # nothing usable, or a broken document: one line that says why
            assert "\n" not in str(exc) and ("toy" in str(exc))
            return None
    stats = split.stats
    assert stats.rows_read == sum(1 for line in lines if line.strip())
    assert stats.rows_kept + stats.rows_dropped == stats.rows_read
    assert stats.rows_kept == len(split.train) > 0
    assert sum(stats.dropped.values()) == stats.rows_dropped
    assert all(stats.first_dropped[reason] for reason in stats.dropped)
    assert not any(reason.startswith("malformed row") for reason in stats.dropped)  # a converter bug
    return stats


@SETTINGS
@given(lines_of(ALPACA))
def test_messy_alpaca_rows(lines):
    check_load("alpaca", lines)


@SETTINGS
@given(lines_of(SHAREGPT))
def test_messy_sharegpt_rows(lines):
    check_load("sharegpt", lines)


@SETTINGS
@given(lines_of(OPENAI))
def test_messy_openai_rows(lines):
    check_load("openai", lines)


@pytest.mark.parametrize("formatting", sorted(ENTRIES))
def test_good_rows_among_bad_lines_are_kept(formatting):
    good = {
        "alpaca": {"instruction": "hi", "output": "yo"},
        "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        "openai": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    }[formatting]
    check_load(formatting, [json.dumps(good).encode(), *BAD_LINES, json.dumps(good).encode()])


def test_lone_surrogate_escapes_are_dropped():
    good = json.dumps({"instruction": "hi", "output": "yo"}).encode()
    pair = b'{"instruction": "\\ud83d\\ude00", "output": "x"}'  # an emoji, escaped as a surrogate pair
    stats = check_load("alpaca", [good, b'{"instruction": "\\ud800", "output": "x"}', pair])
    assert stats.rows_kept == 2 and stats.first_dropped == {sources.NOT_UNICODE.reason: ["toy line 2"]}


# Rows on which converters once raised something other than BadRow (found by the tests above).
CONVERTER_CRASHES = [
    ("alpaca", {"instruction": "a", "output": "b", "history": 5}),
    ("alpaca", {"instruction": "a", "output": "b", "history": True}),
    (
        "openai",
        {"messages": [{"role": "system"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ),
]


@pytest.mark.parametrize("formatting, row", CONVERTER_CRASHES)
def test_converters_refuse_malformed_rows_with_badrow(formatting, row):
    entry = ENTRIES[formatting]
    convert = converter(entry.get("formatting", "alpaca"), entry.get("columns"), entry.get("tags"))
    with pytest.raises(BadRow):
        convert(row)


ENTRY_FIELDS = {
    "file_name": st.sampled_from(["toy.jsonl", "../toy.jsonl", "", "."]) | junk,
    "formatting": st.sampled_from(["alpaca", "sharegpt"]) | junk,
    "columns": junk
    | st.dictionaries(st.sampled_from(["prompt", "response", "messages", "system", "tools"]), maybe_text, max_size=3),
    "tags": junk | st.dictionaries(st.sampled_from(["role_tag", "content_tag", "user_tag"]), maybe_text, max_size=2),
    "file_sha1": junk,
    "split": junk,
    "subset": junk,
    "ms_hub_url": junk,
}


@SETTINGS
@given(st.fixed_dictionaries({}, optional=ENTRY_FIELDS) | junk)
@example({"file_name": None})  # once a TypeError
def test_messy_dataset_info_entries(entry):
    """Any dataset_info.json entry: the data loads or one ChipspanError line says what is wrong."""
    good = {
        "instruction": "hi",
        "output": "yo",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
    }
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "data"
        folder.mkdir()
        (folder / "toy.jsonl").write_text(json.dumps(good))
        (folder / "dataset_info.json").write_text(json.dumps({"toy": entry}))
        data = DataArguments(dataset="toy", dataset_dir=str(folder), template="default", cutoff_len=64)
        try:
            load_dataset_split(data, tokenizer(), use_cache=False)
        except ChipspanError as exc:
            assert "\n" not in str(exc)
