"""Data formats: sharegpt and OpenAI-style rows encode like the equivalent alpaca rows."""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from helpers import DEMO_DATA, LLAMA2_TOKENIZER

from chipspan.data import IGNORE_INDEX, load_examples
from chipspan.data.formats import BadRow, converter
from chipspan.errors import ChipspanError
from chipspan.models.tokenizer import Tokenizer

EOS = 2
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
}
HISTORY = {"prompt": "instruction", "response": "output", "history": "history", "system": "system"}
MULTI_TURN = {"system": "Be brief.", "history": [["2+2?", "4"]], "instruction": "and 3+3?", "output": "6"}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_folder(LLAMA2_TOKENIZER)


def sharegpt(*turns, role="from", content="value"):
    """A message list from (role, content) pairs."""
    return [{role: r, content: c} for r, c in turns]


def encode(folder: Path, tok, rows: list, **entry):
    """Examples of ``rows`` registered as dataset 'toy' with the entry keys ``entry``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy.json").write_text(json.dumps(rows), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "toy.json", **entry}}))
    return load_examples("toy", folder, tok, "default")


def test_sharegpt_multi_turn_with_system_equals_alpaca_with_history(tmp_path, tok):
    [alpaca] = encode(tmp_path / "alpaca", tok, [MULTI_TURN], columns=HISTORY)
    messages = sharegpt(("system", "Be brief."), ("human", "2+2?"), ("gpt", "4"), ("human", "and 3+3?"), ("gpt", "6"))
    [share] = encode(tmp_path / "sharegpt", tok, [{"conversations": messages}], formatting="sharegpt")
    assert share == alpaca
    assert alpaca.labels.count(EOS) == 2 and alpaca.labels[0] == IGNORE_INDEX  # both answers trained


def test_sharegpt_system_column_and_renamed_messages(tmp_path, tok):
    [alpaca] = encode(tmp_path / "alpaca", tok, [MULTI_TURN], columns=HISTORY)
    chat = sharegpt(("human", "2+2?"), ("gpt", "4"), ("human", "and 3+3?"), ("gpt", "6"))
    row = {"chat": chat, "sys": "Be brief."}
    [share] = encode(
        tmp_path / "sharegpt", tok, [row], formatting="sharegpt", columns={"messages": "chat", "system": "sys"}
    )
    assert share == alpaca


def test_openai_rows_equal_sharegpt_rows(tmp_path, tok):
    turns = [("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("tool", '{"x": 1}'), ("assistant", "6")]
    openai = {"messages": sharegpt(*turns, role="role", content="content")}
    names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
    share = {"conversations": sharegpt(*[(names[r], c) for r, c in turns])}
    tags = {**OPENAI_TAGS, "observation_tag": "tool"}
    from_openai = encode(
        tmp_path / "openai", tok, [openai], formatting="sharegpt", columns={"messages": "messages"}, tags=tags
    )
    assert from_openai == encode(tmp_path / "sharegpt", tok, [share], formatting="sharegpt")


def test_function_calls_and_observations_use_the_template_tool_slots(tmp_path, tok):
    """LLaMA-Factory 0.5's ``default``: a call is written "Action: name\nAction Input: arguments" + EOS, an observation
    like a user turn; an empty tool list adds nothing to the system."""
    call = '{"name": "f", "arguments": {"x": 1}}'
    calls = sharegpt(("human", "q"), ("function_call", call), ("observation", "42"), ("gpt", "a"))
    plain = sharegpt(("human", "q"), ("gpt", 'Action: f\nAction Input: {"x": 1}'), ("human", "42"), ("gpt", "a"))
    with_tools = encode(
        tmp_path / "a",
        tok,
        [{"conversations": calls, "tools": "[]"}],
        formatting="sharegpt",
        columns={"messages": "conversations", "tools": "tools"},
    )
    assert with_tools == encode(tmp_path / "b", tok, [{"conversations": plain}], formatting="sharegpt")


def test_broken_sharegpt_rows_are_dropped_and_counted(tmp_path, tok, caplog):
    good = sharegpt(("human", "hi"), ("gpt", "yo"))
    rows = [
        {"conversations": good},
        {"conversations": sharegpt(("human", "hi"), ("human", "again"), ("gpt", "yo"))},
        {"conversations": sharegpt(("gpt", "yo"), ("human", "hi"))},
        {"conversations": sharegpt(("human", "hi"), ("gpt", "yo"), ("human", "and?"))},
        {"conversations": sharegpt(("human", "hi"), ("bot", "yo"))},
        {"conversations": sharegpt(("human", "hi"), ("system", "late"), ("gpt", "yo"))},
        {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "yo"}]},
        {"conversations": []},
        {"conversations": "hi"},
        {"other": good},
        ["not", "an", "object"],
        {"conversations": good, "system": 3},
    ]
    with caplog.at_level(logging.WARNING, logger="chipspan.data"):
        examples = encode(
            tmp_path, tok, rows, formatting="sharegpt", columns={"messages": "conversations", "system": "system"}
        )
    assert examples == encode(tmp_path / "good", tok, [{"conversations": good}], formatting="sharegpt")
    assert "dropped 11 of 12 rows" in caplog.text
    for reason in (
        "3 roles do not alternate user/assistant (first: row 2)",
        "1 ends without an assistant turn (first: row 4)",
        "1 a message has an unknown role (first: row 5)",
        "1 a message is not an object with text value (first: row 7)",
        "1 has no messages (first: row 8)",
        "1 conversations is not a list (first: row 9)",
        "1 conversations is missing (first: row 10)",
        "1 row is not a JSON object (first: row 11)",
        "1 system is not text (int) (first: row 12)",
    ):
        assert reason in caplog.text


def test_tags_an_entry_leaves_out_are_unset_as_in_llamafactory(tmp_path, tok):
    turns = [("system", "s"), ("user", "hi"), ("assistant", "yo")]
    row = {"messages": sharegpt(*turns, role="role", content="content")}
    tags = {key: OPENAI_TAGS[key] for key in ("role_tag", "content_tag", "user_tag", "assistant_tag")}
    with pytest.raises(ChipspanError, match="no usable rows"):
        encode(tmp_path, tok, [row], formatting="sharegpt", columns={"messages": "messages"}, tags=tags)


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"formatting": "ranking"},
            "formatting 'ranking', which is not supported: use one of alpaca, sharegpt",
        ),
        ({"formatting": "sharegpt", "tags": ["from"]}, "tags must be a JSON object"),
        ({"columns": {"prompt": ["instruction"]}}, "columns must be a JSON object of names"),
        ({"tags": {"role_tag": 1}}, "tags must be a JSON object of names"),
        ({"file_name": 5}, "file_name must be text, not 5"),
        ({"file_sha1": ["x"]}, "file_sha1 must be text"),
        ({"split": {}}, "split must be text"),
    ],
)
def test_bad_entries_say_so(tmp_path, tok, entry, message):
    with pytest.raises(ChipspanError, match=message) as info:
        encode(tmp_path, tok, [], **entry)
    assert "\n" not in str(info.value)
    if "formatting" not in entry:
        assert f"dataset 'toy' in {tmp_path.absolute() / 'dataset_info.json'}" in str(info.value)


@pytest.mark.parametrize("file_name", ["../outside.json", "/etc/passwd", "data/../../outside.json", "", "."])
def test_a_file_name_outside_the_dataset_folder_is_refused(tmp_path, tok, file_name):
    (tmp_path / "outside.json").write_text(json.dumps([{"instruction": "secret", "output": "x"}]))
    folder = tmp_path / "data"
    with pytest.raises(
        ChipspanError, match=f"file_name '{re.escape(file_name)}' is not a file inside --dataset_dir"
    ) as info:
        encode(folder, tok, [], file_name=file_name)
    assert "no absolute path, no '..'" in str(info.value)


def test_a_malformed_dataset_info_is_one_line(tmp_path, tok):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "dataset_info.json").write_text("{" * 100_000)
    with pytest.raises(ChipspanError, match="dataset_info.json is not valid JSON"):
        load_examples("toy", tmp_path, tok, "default")


def test_glaive_toolcall_demo_loads(tmp_path, tok, caplog):
    shutil.copy(DEMO_DATA / "glaive_toolcall_zh_demo.json", tmp_path)
    entry = {
        "file_name": "glaive_toolcall_zh_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps({"glaive": entry}))
    with caplog.at_level(logging.WARNING, logger="chipspan.data"):
        examples = load_examples("glaive", tmp_path, tok, "default", cutoff_len=4096)
    assert len(examples) == 300 and "dropped" not in caplog.text
    for example in examples:
        trained = [t for t in example.labels if t != IGNORE_INDEX]
        assert len(example.input_ids) == len(example.labels) and trained and example.labels[-1] == EOS


@pytest.mark.parametrize(
    "revision, row, user",
    [
        ("lf-0.5", {"instruction": "", "input": "only an input", "output": "ok"}, "\nonly an input"),
        ("lf-0.9", {"instruction": "", "input": "only an input", "output": "ok"}, "only an input"),
        ("lf-0.9", {"input": "q", "output": "ok"}, "q"),  # LLaMA-Factory 0.9.5's converter gives these
        ("lf-0.9", {"instruction": "a", "input": "b", "output": "ok"}, "a\nb"),
    ],
)
def test_alpaca_user_turn_is_read_as_each_revision_reads_it(revision, row, user):
    assert converter("alpaca", None, None, revision)(row).prompt == (("user", user),)


def test_lf05_needs_an_instruction():
    with pytest.raises(BadRow, match="instruction is missing"):
        converter("alpaca", None, None, "lf-0.5")({"input": "q", "output": "ok"})


@pytest.mark.parametrize("template", ["qwen", "auto"])
@pytest.mark.parametrize(
    "call, tools, message",
    [
        (
            '{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "[]",
            "is not JSON with name and arguments",
        ),
        ('{"name": "f", "arguments": {}}', "[" * 100_000 + "]" * 100_000, "tools column is not JSON"),
        ('{"name": "f", "arguments": {}}', "[1, 2]", "tools"),
    ],
    ids=["deep-call", "deep-tools", "tools-not-objects"],
)
def test_bad_tool_text_is_one_line(tmp_path, template, call, tools, message):
    tok = Tokenizer.from_folder(LLAMA2_TOKENIZER)
    tok.chat_template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    calls = sharegpt(("human", "q"), ("function_call", call), ("observation", "42"), ("gpt", "a"))
    (tmp_path / "toy.json").write_text(json.dumps([{"conversations": calls, "tools": tools}]))
    (tmp_path / "dataset_info.json").write_text(
        json.dumps(
            {
                "toy": {
                    "file_name": "toy.json",
                    "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "tools": "tools"},
                }
            }
        )
    )
    with pytest.raises(ChipspanError, match=message) as info:
        load_examples("toy", tmp_path, tok, template, template_revision="lf-0.9")
    assert "\n" not in str(info.value)
