"""The data pipeline around encoding: sources and messy files, streaming, mixing, val_size, the cache,
statistics and `chipspan data`."""

import json
import logging
import re
import sys
import tracemalloc
import types

import numpy as np
import pytest
from helpers import LLAMA2_TOKENIZER

from chipspan import cli
from chipspan.args import DataArguments
from chipspan.data import formats, loader, sources
from chipspan.data.loader import load_dataset_split, load_examples
from chipspan.data.mixing import mix
from chipspan.errors import ChipspanError
from chipspan.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_folder(LLAMA2_TOKENIZER)


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("CHIPSPAN_CACHE", str(root))
    return root


def rows(name, n):
    return [{"instruction": f"{name}{i}", "output": "x"} for i in range(n)]


def register(folder, name, file_name, **entry):
    path = folder / "dataset_info.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    info[name] = {"file_name": file_name, **entry}
    path.write_text(json.dumps(info))


def write_jsonl(folder, name, items, file_name=None):
    """``items`` are rows (dicts, written as JSON) or raw lines (bytes or str, written as they are)."""
    folder.mkdir(parents=True, exist_ok=True)
    file_name = file_name or f"{name}.jsonl"
    lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode() for r in items]
    (folder / file_name).write_bytes(b"\n".join(lines) + b"\n")
    register(folder, name, file_name)


def load(folder, tok, dataset="toy", stage="sft", seed=42, use_cache=False, **flags):
    data = DataArguments(dataset=dataset, dataset_dir=str(folder), **flags)
    return load_dataset_split(data, tok, stage, seed, use_cache=use_cache)


def prompts(examples, tok):
    """The instruction of each example, from its decoded prompt."""
    return [tok.decode(e.input_ids).split("Human: ")[1].split("\n")[0] for e in examples]


# ---- sources and messy files ---------------------------------------------------------------------


def test_bad_json_lines_are_dropped_and_counted_with_line_numbers(tmp_path, tok, caplog):
    write_jsonl(tmp_path, "toy", [rows("a", 1)[0], "{not json", rows("b", 1)[0], "", "[1, 2", rows("c", 1)[0]])
    with caplog.at_level(logging.WARNING, logger="chipspan.data"):
        split = load(tmp_path, tok)
    assert prompts(split.train, tok) == ["a0", "b0", "c0"]
    stats = split.stats
    assert (stats.rows_read, stats.rows_kept, stats.dropped) == (5, 3, {"line is not valid JSON": 2})
    assert stats.first_dropped["line is not valid JSON"] == ["toy line 2", "toy line 5"]
    assert "dropped 2 of 5 rows: 2 line is not valid JSON (first: line 2)" in caplog.text


def test_rows_past_the_size_limits_are_dropped_and_counted_before_tokenizing(tmp_path, tok, monkeypatch):
    huge = {"instruction": "x" * formats.MAX_ROW_CHARS, "output": "y"}
    chatty = {"instruction": "q", "output": "a", "history": [["q", "a"]] * (formats.MAX_ROW_MESSAGES // 2)}
    write_jsonl(tmp_path, "toy", [rows("a", 1)[0], huge, chatty, rows("b", 1)[0]])
    register(
        tmp_path, "toy", "toy.jsonl", columns={"prompt": "instruction", "response": "output", "history": "history"}
    )
    tokenized = []
    encode_batch = tok.encode_batch
    monkeypatch.setattr(tok, "encode_batch", lambda texts: tokenized.extend(texts) or encode_batch(texts))
    split = load(tmp_path, tok)
    assert prompts(split.train, tok) == ["a0", "b0"]
    assert split.stats.dropped == {"has more than 2,000,000 characters": 1, "has more than 2,000 messages": 1}
    assert split.stats.first_dropped["has more than 2,000,000 characters"] == ["toy line 2"]
    assert "2 dropped" in split.stats.summary() and max(map(len, tokenized)) < 100


def test_auto_template_bounds_answers_times_characters(tmp_path, monkeypatch):
    """``auto`` renders a row once per answer: a row with many answers and much text is dropped there only."""
    tok = Tokenizer.from_folder(LLAMA2_TOKENIZER)
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    chatty = {"instruction": "q", "output": "a" * 100, "history": [["q", "a" * 100]] * 9}  # 10 answers, ~1,000 chars
    write_jsonl(tmp_path, "toy", [rows("a", 1)[0], chatty])
    register(
        tmp_path, "toy", "toy.jsonl", columns={"prompt": "instruction", "response": "output", "history": "history"}
    )
    monkeypatch.setattr(formats, "MAX_AUTO_RENDER", 5_000)
    split = load(tmp_path, tok, template="auto")
    assert split.stats.dropped == {"is too long for --template auto (answers x characters above 5,000)": 1}
    assert not load(tmp_path, tok, template="default").stats.dropped


def test_sft_rows_are_tokenized_in_chunks_bounded_by_characters(tmp_path, tok, monkeypatch):
    write_jsonl(tmp_path, "toy", rows("row", 6))
    whole = load(tmp_path, tok)
    calls = []
    encode_batch = tok.encode_batch
    monkeypatch.setattr(tok, "encode_batch", lambda texts: calls.append(len(texts)) or encode_batch(texts))
    monkeypatch.setattr(loader, "CHUNK_CHARS", 10)  # each 5-character row fills half a chunk
    chunked = load(tmp_path, tok)
    assert list(chunked.train) == list(whole.train) and chunked.stats.dropped == whole.stats.dropped
    assert len(calls) == 3


def test_a_csv_field_longer_than_pythons_default_limit_is_read(tmp_path, tok):
    long = "y" * 200_000
    (tmp_path / "toy.csv").write_text(f"instruction,output\nq0,{long}\nq1,x\n")
    register(tmp_path, "toy", "toy.csv")
    split = load(tmp_path, tok, cutoff_len=64)
    assert (split.stats.rows_kept, split.stats.train, split.stats.truncated) == (2, 2, 1)
    assert prompts(split.train[1:], tok) == ["q1"] and not split.stats.dropped


def test_a_line_past_the_limit_is_skipped_without_holding_it(tmp_path, tok):
    """A 64 MB line in a JSON lines file, streamed: dropped and counted, read in pieces."""
    folder = tmp_path / "data"
    write_jsonl(
        folder,
        "toy",
        [rows("a", 1)[0], b'{"instruction": "' + b"x" * (4 * sources.MAX_LINE_BYTES) + b'"}', rows("b", 1)[0]],
    )
    tracemalloc.start()
    try:
        split = load(folder, tok, streaming=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(prompts(split.train, tok)) == ["a0", "b0"]
    assert split.stats.dropped == {"line is longer than 16,000,000 bytes": 1}
    assert peak < 3 * sources.MAX_LINE_BYTES  # the line is 4 times as long


def test_json_nested_too_deeply(tmp_path, tok):
    write_jsonl(tmp_path, "toy", [rows("a", 1)[0], "[" * 100_000 + "]" * 100_000])
    split = load(tmp_path, tok)
    assert prompts(split.train, tok) == ["a0"] and split.stats.dropped == {"line is JSON nested too deeply": 1}
    (tmp_path / "deep.json").write_text("[" + '{"a": [' * 50_000)
    register(tmp_path, "deep", "deep.json")
    with pytest.raises(ChipspanError, match=r"deep.json is JSON nested deeper than Python's JSON reader allows"):
        load(tmp_path, tok, dataset="deep")


def test_streaming_refuses_a_json_document_it_would_read_whole(tmp_path, tok):
    (tmp_path / "big.json").write_text("[" + " " * sources.MAX_LINE_BYTES + json.dumps(rows("a", 1)[0]) + "]")
    register(tmp_path, "big", "big.json")
    assert prompts(load(tmp_path, tok, dataset="big").train, tok) == ["a0"]
    with pytest.raises(ChipspanError, match="big.json is one JSON document .* --streaming reads JSON lines"):
        load(tmp_path, tok, dataset="big", streaming=True)


def test_lines_that_are_not_utf8_are_dropped(tmp_path, tok):
    write_jsonl(tmp_path, "toy", [rows("a", 1)[0], b'{"instruction": "\xff\xfe", "output": "x"}', rows("b", 1)[0]])
    split = load(tmp_path, tok)
    assert prompts(split.train, tok) == ["a0", "b0"]
    assert split.stats.first_dropped == {"line is not UTF-8 text": ["toy line 2"]}


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-32"])
def test_files_with_a_byte_order_mark_read_as_utf8(tmp_path, tok, encoding):
    data = rows("q", 3)
    for kind, text in (("json", json.dumps(data)), ("jsonl", "\n".join(json.dumps(r) for r in data))):
        (tmp_path / f"toy.{kind}").write_bytes(text.encode(encoding))
        register(tmp_path, f"toy_{kind}", f"toy.{kind}")
        assert prompts(load(tmp_path, tok, f"toy_{kind}").train, tok) == ["q0", "q1", "q2"]


@pytest.mark.parametrize(
    "content, message",
    [
        (bytes(range(256)) * 8, "has no readable row: its first bad line 1 is not"),
        ("a\nb\nc\n".encode("utf-16-le"), "NUL bytes: UTF-16 without a byte-order mark"),
        (b'[{"instruction": "a", "output": "x"},\n {"instruction": ', "is not valid JSON (Expecting value at line 2"),
        (b'[\n{"instruction": "\xff"}]', "is not utf-8 text (invalid start byte on line 2)"),
    ],
)
def test_a_file_that_is_not_rows_is_one_clear_error(tmp_path, tok, content, message):
    (tmp_path / "toy.json").write_bytes(content)
    register(tmp_path, "toy", "toy.json")
    with pytest.raises(ChipspanError, match=re.escape(message)) as info:
        load(tmp_path, tok)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"PAR1 not really parquet PAR1", b"", b"PAR1" + bytes(range(256)) * 4])
def test_a_broken_parquet_file_is_one_clear_error(tmp_path, tok, content):
    (tmp_path / "toy.parquet").write_bytes(content)
    register(tmp_path, "toy", "toy.parquet")
    with pytest.raises(ChipspanError, match="toy.parquet is not a readable Parquet file") as info:
        load(tmp_path, tok)
    assert "\n" not in str(info.value)


def test_csv_and_text_lines_that_are_not_utf8_are_dropped(tmp_path, tok):
    (tmp_path / "toy.csv").write_bytes(b"instruction,output\na0,x\n\xff\xfe,x\nb0,x\n")
    register(tmp_path, "toy", "toy.csv")
    split = load(tmp_path, tok)
    assert prompts(split.train, tok) == ["a0", "b0"]
    assert split.stats.first_dropped == {"line is not UTF-8 text": ["toy line 3"]}
    (tmp_path / "t.txt").write_bytes(b"a b\n\xff\nc\n")
    register(tmp_path, "text", "t.txt", columns={"prompt": "text"})
    split = load(tmp_path, tok, "text", stage="pt", cutoff_len=2)
    assert split.stats.dropped == {"line is not UTF-8 text": 1} and split.stats.rows_kept == 2


def test_no_usable_rows_says_why(tmp_path, tok):
    write_jsonl(tmp_path, "toy", [{"instruction": None, "output": "x"}, {"output": "x"}, "{oops", {"q": 1}])
    with pytest.raises(
        ChipspanError,
        match=r"dataset toy has no usable rows: all 4 were dropped: 3 instruction is "
        r"missing \(first: toy line 1, toy line 2, toy line 4\); 1 line is not",
    ):
        load(tmp_path, tok)


def test_rows_with_nothing_to_train_on_are_dropped(tmp_path, tok):
    write_jsonl(tmp_path, "toy", [{"instruction": "a", "output": ""}, {"instruction": "b", "output": "y"}])
    split = load(tmp_path, tok, template="empty")  # no EOS: an empty answer leaves no trained token
    assert len(split.train) == 1
    assert (split.stats.rows_read, split.stats.rows_kept) == (2, 1)
    assert split.stats.first_dropped == {"has no tokens to train on": ["toy line 1"]}


def test_stats_count_tokens_and_truncated_rows(tmp_path, tok):
    write_jsonl(tmp_path, "toy", [{"instruction": "a b c d e f g h", "output": "x y z " * 10}, rows("s", 1)[0]])
    stats = load(tmp_path, tok, cutoff_len=30).stats
    assert (stats.truncated, stats.train) == (1, 2)
    assert stats.tokens == 30 + len(load_examples("toy", tmp_path, tok)[1].input_ids)
    assert "2 rows read, 2 kept, 0 dropped; 2 train + 0 eval examples" in stats.summary()


def test_hub_entries_need_datasets_online_and_script_entries_are_refused(tmp_path, tok, monkeypatch):
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"hub": {"hf_hub_url": "org/data", "split": "train"}, "script": {"script_url": "x"}})
    )
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ChipspanError, match=r"pip install datasets, or download it and register the file"):
        load(tmp_path, tok, "hub")
    with pytest.raises(ChipspanError, match="loading script, which runs arbitrary code"):
        load(tmp_path, tok, "script")

    calls = []
    fake = types.SimpleNamespace(load_dataset=lambda url, **kw: calls.append((url, kw)) or rows("h", 2))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert prompts(load(tmp_path, tok, "hub", use_cache=True).train, tok) == ["h0", "h1"]
    assert calls == [("org/data", {"name": None, "split": "train", "streaming": False})]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ChipspanError, match="HF_HUB_OFFLINE is set: unset it to download, or download it"):
        load(tmp_path, tok, "hub")


# ---- streaming -------------------------------------------------------------------------------------


def test_streaming_reads_lazily_and_shuffles_with_a_buffer(tmp_path, tok):
    write_jsonl(tmp_path, "toy", rows("r", 30) + ["{broken"])
    entry_files = sources.dataset_files(*_entry(tmp_path))
    lazy = sources.iter_rows(_entry(tmp_path)[0], entry_files, streaming=True)
    assert next(lazy) == ("line 1", rows("r", 1)[0])  # a generator: nothing else is read yet

    plain = load(tmp_path, tok)
    streamed = load(tmp_path, tok, streaming=True, buffer_size=8)
    assert sorted(prompts(streamed.train, tok)) == sorted(prompts(plain.train, tok))
    assert prompts(streamed.train, tok) != prompts(plain.train, tok)
    assert prompts(load(tmp_path, tok, streaming=True, buffer_size=8).train, tok) == prompts(streamed.train, tok)
    assert prompts(load(tmp_path, tok, streaming=True, buffer_size=1).train, tok) == prompts(plain.train, tok)
    assert streamed.stats.dropped == {"line is not valid JSON": 1}

    held = load(tmp_path, tok, streaming=True, buffer_size=8, val_size=5)
    assert prompts(held.eval, tok) == prompts(streamed.train, tok)[:5]
    assert prompts(held.train, tok) == prompts(streamed.train, tok)[5:]
    with pytest.raises(ChipspanError, match="give val_size as a count, not the fraction 0.1"):
        load(tmp_path, tok, streaming=True, val_size=0.1)


def _entry(folder):
    from chipspan.data import registry

    [entry] = registry.lookup("toy", folder)
    return entry, folder


# ---- mixing ----------------------------------------------------------------------------------------


def test_mix_meanings():
    a, b, c = [0, 1, 2], [10, 11, 12, 13, 14], [20, 21]
    sources_ = [lambda: a, lambda: b, lambda: c]
    assert list(mix(sources_, "concat")) == a + b + c
    assert list(mix(sources_, "interleave_under")) == [0, 10, 20, 1, 11, 21]  # 3 x the shortest
    over = list(mix(sources_, "interleave_over"))  # 3 x the longest, the others restarted
    assert over == [0, 10, 20, 1, 11, 21, 2, 12, 20, 0, 13, 21, 1, 14, 20]
    assert sorted(mix(sources_, "interleave_once")) == sorted(a + b + c)
    # with probabilities (these equal datasets.interleave_datasets' for the same seed)
    assert list(mix(sources_, "interleave_under", [0.2, 0.5, 0.3], seed=1)) == [10, 20, 0, 21]
    drawn = list(mix(sources_, "interleave_over", [0.2, 0.5, 0.3], seed=1))
    assert drawn[-1] == 2 and set(drawn) == set(a + b + c) and len(drawn) == 17
    assert list(mix(sources_, "interleave_over", [0.2, 0.5, 0.3], seed=1)) == drawn
    assert list(mix(sources_, "interleave_over", [0.2, 0.5, 0.3], seed=2)) != drawn
    assert list(mix([lambda: a, lambda: []], "interleave_under")) == []
    assert list(mix([lambda: a, lambda: []], "interleave_over")) == a


def test_interleaving_datasets(tmp_path, tok):
    write_jsonl(tmp_path, "a", rows("a", 2))
    write_jsonl(tmp_path, "b", rows("b", 4))
    under = load(tmp_path, tok, "a,b", mix_strategy="interleave_under")
    assert prompts(under.train, tok) == ["a0", "b0", "a1", "b1"]
    over = load(tmp_path, tok, "a,b", mix_strategy="interleave_over", interleave_probs="0.5,0.5")
    assert set(prompts(over.train, tok)) == {"a0", "a1", "b0", "b1", "b2", "b3"}
    assert over.stats.rows_read == 6  # each row read and counted once, however often it is used
    streamed = load(
        tmp_path, tok, "a,b", mix_strategy="interleave_over", interleave_probs="0.5,0.5", streaming=True, buffer_size=1
    )
    assert prompts(streamed.train, tok) == prompts(over.train, tok)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"interleave_probs": "0.5,0.5"}, "interleave_probs needs --mix_strategy interleave_under"),
        ({"mix_strategy": "interleave_under", "interleave_probs": "1"}, "has 1 values for 2 datasets"),
        ({"mix_strategy": "interleave_under", "interleave_probs": "0.5,0.6"}, r"sum to 1, got 0.5,0.6 \(sum 1.1\)"),
        ({"mix_strategy": "interleave_under", "interleave_probs": "a,b"}, "must be a comma list of numbers"),
        ({"val_size": -1}, "val_size must be a count"),
        ({"val_size": 2.5}, "val_size 2.5 is neither a whole count nor a fraction below 1"),
    ],
)
def test_bad_flags_are_refused_before_reading(tmp_path, tok, flags, message):
    write_jsonl(tmp_path, "a", ["{broken"])  # never read
    write_jsonl(tmp_path, "b", ["{broken"])
    with pytest.raises(ChipspanError, match=message):
        load(tmp_path, tok, "a,b", **flags)


# ---- val_size --------------------------------------------------------------------------------------


@pytest.mark.parametrize("val_size, held", [(3, 3), (0.25, 3), (0.1, 1)])
def test_val_size_splits_shuffled_rows_like_train_test_split(tmp_path, tok, val_size, held):
    write_jsonl(tmp_path, "toy", rows("r", 10))
    split = load(tmp_path, tok, val_size=val_size, seed=7)
    order = np.random.default_rng(7).permutation(10)  # datasets' train_test_split(seed=7) draws this
    assert prompts(split.eval, tok) == [f"r{i}" for i in order[:held]]
    assert prompts(split.train, tok) == [f"r{i}" for i in order[held:]]
    assert (split.stats.train, split.stats.eval) == (10 - held, held)


def test_val_size_that_leaves_no_training_rows(tmp_path, tok):
    write_jsonl(tmp_path, "toy", rows("r", 3) + [{"instruction": None}])
    with pytest.raises(ChipspanError, match="val_size 3 leaves no training rows: the data has 3 usable rows"):
        load(tmp_path, tok, val_size=3)


# ---- the cache -------------------------------------------------------------------------------------


def test_cache_hit_overwrite_change_and_corruption(tmp_path, tok, cache_root, caplog):
    folder = tmp_path / "data"
    write_jsonl(folder, "toy", rows("r", 5) + ["{bad"])
    cold = load(folder, tok, use_cache=True, val_size=2)
    [cached] = (cache_root / "data").iterdir()
    assert cached.suffix == ".npz" and not cold.stats.from_cache

    warm = load(folder, tok, use_cache=True, val_size=2)
    assert warm.stats.from_cache and warm.stats.dropped == cold.stats.dropped
    assert list(warm.train) == list(cold.train) and list(warm.eval) == list(cold.eval)
    assert not load(folder, tok, use_cache=True, val_size=2, overwrite_cache=True).stats.from_cache
    assert not load(folder, tok, use_cache=True, val_size=1).stats.from_cache  # another flag, another key

    write_jsonl(folder, "toy", rows("s", 5))  # new content, same name
    assert prompts(load(folder, tok, use_cache=True).train, tok)[0] == "s0"

    for path in (cache_root / "data").iterdir():
        path.write_bytes(b"PK\x03\x04 not a zip")
    with caplog.at_level(logging.WARNING, logger="chipspan.data"):
        again = load(folder, tok, use_cache=True)
    assert not again.stats.from_cache and "is unreadable" in caplog.text and "encoding again" in caplog.text
    assert load(folder, tok, use_cache=True).stats.from_cache  # rebuilt
    assert not [p for p in (cache_root / "data").iterdir() if p.suffix != ".npz"]  # no temporary files left


def _damage(path, **arrays):
    """Rewrite the cache file at ``path`` with some arrays replaced (a function of the old array or a value)."""
    with np.load(path) as data:
        content = {k: data[k] for k in data.files}
    for key, change in arrays.items():
        content[key] = change(content[key]) if callable(change) else change
    with open(path, "wb") as f:
        np.savez(f, **content)


def _stats_json(text):
    return np.frombuffer(text.encode(), dtype=np.uint8)


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
        lambda path: _damage(path, train_offsets=lambda o: o[::-1].copy()),
        lambda path: _damage(path, train_offsets=lambda o: o + 1),
        lambda path: _damage(path, train_input_ids=lambda ids: ids.astype(np.float64)),
        lambda path: _damage(path, train_input_ids=lambda ids: ids + 10**6),
        lambda path: _damage(path, train_labels=lambda labels: labels[:-1].copy()),
        lambda path: _damage(path, stats=_stats_json("[1, 2]")),
        lambda path: _damage(path, stats=_stats_json('{"rows_read": "many"}')),
        lambda path: _damage(path, stats=lambda s: _stats_json(bytes(s).decode().replace('"train": 4', '"train": 9'))),
        lambda path: _damage(path, stats=_stats_json("[" * 100_000)),
    ],
    ids=[
        "truncated",
        "offsets-reversed",
        "offsets-shifted",
        "float-ids",
        "ids-outside-vocab",
        "labels-short",
        "stats-list",
        "stats-types",
        "stats-counts",
        "stats-deep",
    ],
)
def test_a_damaged_cache_is_rebuilt_equal_to_a_fresh_encode(tmp_path, tok, cache_root, caplog, damage):
    folder = tmp_path / "data"
    write_jsonl(folder, "toy", rows("r", 5))
    fresh = load(folder, tok, val_size=1)
    load(folder, tok, use_cache=True, val_size=1)
    [cached] = (cache_root / "data").iterdir()
    damage(cached)
    with caplog.at_level(logging.WARNING, logger="chipspan.data"):
        again = load(folder, tok, use_cache=True, val_size=1)
    assert "is unreadable" in caplog.text and "encoding again" in caplog.text and not again.stats.from_cache
    assert list(again.train) == list(fresh.train) and list(again.eval) == list(fresh.eval)
    rebuilt = load(folder, tok, use_cache=True, val_size=1)
    assert rebuilt.stats.from_cache and list(rebuilt.train) == list(fresh.train)


def test_load_examples_does_not_cache(tmp_path, tok, cache_root):
    write_jsonl(tmp_path, "toy", rows("r", 2))
    assert len(load_examples("toy", tmp_path, tok)) == 2
    assert not (cache_root / "data").exists()


# ---- chipspan data ---------------------------------------------------------------------------------


def test_chipspan_data_writes_examples_with_masked_spans(tmp_path, tok, capsys):
    write_jsonl(tmp_path, "toy", [{"instruction": "hi", "output": "Hello!"}, rows("r", 1)[0], "{bad"])
    out = tmp_path / "out.jsonl"
    code = cli.main(
        [
            "data",
            "--model_name_or_path",
            str(LLAMA2_TOKENIZER),
            "--dataset",
            "toy",
            "--dataset_dir",
            str(tmp_path),
            "--val_size",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["split"] for line in lines] == ["train", "eval"]
    hello = next(line for line in lines if "Hello" in line["text"])
    assert hello["text"] == "«Human: hi\nAssistant: » Hello!</s>"
    assert len(hello["input_ids"]) == len(hello["labels"])
    err = capsys.readouterr().err
    assert "3 rows read, 2 kept, 1 dropped; 1 train + 1 eval examples" in err
    assert "1 line is not valid JSON (first: toy line 3)" in err

    assert cli.main(["data", "--dataset", "toy", "--dataset_dir", str(tmp_path)]) == 1
    assert "pass --model_name_or_path" in capsys.readouterr().err
