"""Templates in both revisions, token for token against LLaMA-Factory's own code (frozen fixtures made by
tests/fixtures/data/make_template_reference.py), plus tool turns, train_on_prompt, mask_history and
``--template auto``."""

import functools
import json
from pathlib import Path

import pytest
import tokenizers
from helpers import LLAMA2_TOKENIZER

from chipspan.data import IGNORE_INDEX, template_tools
from chipspan.data.encode import encode_supervised
from chipspan.data.formats import converter
from chipspan.data.templates import TEMPLATES, fix_tokenizer, get_template
from chipspan.errors import ChipspanError
from chipspan.models.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"
M = IGNORE_INDEX
REFERENCES = {"lf-0.5": "template_reference_lf05.json", "lf-0.9": "template_reference_lf09.json"}


@functools.cache
def reference(revision: str) -> dict:
    return json.loads((FIXTURES / REFERENCES[revision]).read_text(encoding="utf-8"))


def reference_cases() -> list:
    return [
        pytest.param(revision, tokenizer_name, name, id=f"{revision}-{tokenizer_name}-{name}")
        for revision in REFERENCES
        for tokenizer_name, names in reference(revision)["cases"].items()
        for name in names
    ]


def conversations(fixture: dict) -> list:
    out = []
    for formatting in ("alpaca", "sharegpt"):
        convert = converter(formatting, fixture["columns"][formatting], None)
        out += [convert(row) for row in fixture["rows"][formatting]]
    return out


def expand_labels(ids: list[int], runs: list) -> list[int]:
    """Labels from the fixture's run-length form (see make_template_reference.py)."""
    labels = []
    for run in runs:
        if isinstance(run, list):
            labels.append(run[0])
        else:
            labels += ids[len(labels) : len(labels) + run] if run > 0 else [M] * -run
    return labels


@pytest.fixture
def tokenizer_folder(request):
    def folder(name: str) -> Path:
        if name == "llama2":
            return LLAMA2_TOKENIZER
        return Path(request.getfixturevalue("llama3_tokenizer_dir" if name == "llama3" else "smollm2_dir"))

    return folder


def tokenizer_with(folder: Path, added: list[str]) -> Tokenizer:
    tok = Tokenizer.from_folder(folder)
    tok.backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in added])
    return tok


@pytest.mark.parametrize("revision, tokenizer_name, name", reference_cases())
def test_equals_llamafactory(revision, tokenizer_name, name, tokenizer_folder, monkeypatch):
    """Every (cutoff, variant) of one template on the fixture rows: ids and labels equal the reference.

    Variants: plain, ``prompt`` (train_on_prompt) and, in lf-0.9, ``history`` (mask_history). Rows
    LLaMA-Factory 0.5 made longer than cutoff_len (+1 with efficient_eos) are only checked to fit."""
    fixture = reference(revision)
    case = fixture["cases"][tokenizer_name][name]
    monkeypatch.setattr(template_tools, "today", lambda: fixture["tool_date"])
    tok = tokenizer_with(tokenizer_folder(tokenizer_name), case["added"])
    template = get_template(name, revision)
    fix_tokenizer(tok, template)
    rows = conversations(fixture)
    for key, expected in case["encodings"].items():
        cutoff, variant = key.split("|")
        cutoff = int(cutoff)
        ours = encode_supervised(
            rows, template, tok, cutoff, train_on_prompt=variant == "prompt", mask_history=variant == "history"
        )
        plain = case["encodings"][f"{cutoff}|plain"]
        for number, (example, row, plain_row) in enumerate(zip(ours, expected, plain, strict=True)):
            ids = row["ids"] if row["ids"] is not None else plain_row["ids"]
            limit = cutoff + template.efficient_eos
            if revision == "lf-0.5" and len(ids) > limit:
                assert len(example.input_ids) <= limit, (key, number)
                continue
            assert example.input_ids == ids, (key, number)
            assert example.labels == expand_labels(ids, row["labels"]), (key, number)


def test_every_template_named_in_the_brief_is_there():
    lf05 = set(TEMPLATES["lf-0.5"])
    assert len(lf05) == 31 and {"alpaca", "chatglm2", "vanilla", "ziya", "xverse"} <= lf05
    lf09_only = {
        "llama3",
        "chatml",
        "empty",
        "smollm",
        "smollm2",
        "qwen3",
        "qwen3_nothink",
        "gemma",
        "gemma2",
        "phi",
        "phi4",
        "llama4",
        "cohere",
        "mistral_small",
        "ministral",
        "deepseek3",
    }
    assert lf09_only <= set(TEMPLATES["lf-0.9"]) and not lf09_only & lf05
    covered = {(rev, n) for rev in REFERENCES for names in reference(rev)["cases"].values() for n in names}
    assert covered == {(rev, n) for rev in REFERENCES for n in TEMPLATES[rev]}  # each one is checked


# ---- tool turns ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_folder(LLAMA2_TOKENIZER)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


TOOLS = json.dumps(
    [
        {
            "name": "add",
            "description": "Add two numbers",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        }
    ]
)
CALL = json.dumps({"name": "add", "arguments": {"a": 1}})
TOOL_ROW = {
    "conversations": [
        {"from": "human", "value": "1+?"},
        {"from": "function_call", "value": CALL},
        {"from": "observation", "value": "2"},
        {"from": "gpt", "value": "It is 2."},
    ],
    "tools": TOOLS,
}
SHAREGPT = {"messages": "conversations", "tools": "tools"}


def test_sharegpt_tool_turns_become_function_and_observation_messages():
    conversation = converter("sharegpt", SHAREGPT, None)(TOOL_ROW)
    assert conversation.prompt == (("user", "1+?"), ("function", CALL), ("observation", "2"))
    assert conversation.response == ("It is 2.",) and conversation.tools == TOOLS


def test_openai_tool_calls_and_consecutive_tool_results():
    """An assistant message with tool_calls is a function call; two tool results are one observation."""
    tags = {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "observation_tag": "tool",
        "function_tag": "function_call",
        "system_tag": "system",
    }
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    row = {
        "messages": [
            {"role": "user", "content": "1+?"},
            {"role": "assistant", "content": None, "tool_calls": [call, call]},
            {"role": "tool", "content": "2"},
            {"role": "tool", "content": "3"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    conversation = converter("sharegpt", {"messages": "messages"}, tags)(row)
    assert conversation.prompt[1] == ("function", json.dumps([call["function"]] * 2))
    assert conversation.prompt[2] == ("observation", "2\n</tool_response>\n<tool_response>\n3")


def test_lf05_default_writes_tools_into_the_system_and_calls_as_actions(tok):
    [ex] = encode_supervised([converter("sharegpt", SHAREGPT, None)(TOOL_ROW)], get_template("default"), tok, 4096)
    tools = template_tools.tools_text("lf-0.5", TOOLS)
    assert tools.startswith("You have access to the following tools:\n> Tool Name: add\n")
    assert "  - a (integer, required): \n" in tools
    call = enc(tok, 'Action: add\nAction Input: {"a": 1}') + [2]
    turn1 = enc(tok, tools) + enc(tok, "Human: 1+?\nAssistant: ")
    turn2 = enc(tok, "\n") + enc(tok, "Human: 2\nAssistant: ")  # the observation is written as a user turn
    answer = enc(tok, "It is 2.") + [2]
    assert ex.input_ids == turn1 + call + turn2 + answer
    assert ex.labels == [M] * len(turn1) + call + [M] * len(turn2) + answer


def test_lf09_qwen_writes_tool_calls_in_xml(tok):
    template = get_template("qwen", "lf-0.9")
    pieces = template.render(
        [("user", "1+?"), ("function", CALL), ("observation", "2"), ("assistant", "ok")], "", TOOLS
    )
    assert pieces[1] == ['<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><|im_end|>\n']
    assert pieces[2] == ["<|im_start|>user\n<tool_response>\n2\n</tool_response><|im_end|>\n<|im_start|>assistant\n"]
    assert "# Tools" in pieces[0][0] and '{"type": "function", "function": {"name": "add"' in pieces[0][0]


def test_tool_format_flag_replaces_the_function_slot():
    template = get_template("default", "lf-0.9", tool_format="qwen")
    assert template.render([("user", "q"), ("function", CALL)], "")[1][0].startswith("<tool_call>\n")
    with pytest.raises(ChipspanError, match="--tool_format needs --template_revision lf-0.9"):
        get_template("default", "lf-0.5", tool_format="qwen")


def test_bad_function_call_json_says_so(tok):
    row = {**TOOL_ROW, "conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f("}]}
    conversation = converter("sharegpt", SHAREGPT, None)(row)
    with pytest.raises(ChipspanError, match="function call 'f\\(' is not JSON with name and arguments"):
        encode_supervised([conversation], get_template("qwen", "lf-0.9"), tok, 1024)
    [ex] = encode_supervised([conversation], get_template("default"), tok, 1024)  # LLaMA-Factory 0.5 wrote it empty
    call = enc(tok, "Action: \nAction Input: ") + [2]
    assert ex.labels[-len(call) :] == call


# ---- options ---------------------------------------------------------------------------------------


MULTI = converter("alpaca", {"prompt": "q", "response": "a", "history": "h"}, None)(
    {"h": [["2+2?", "4"]], "q": "and 3+3?", "a": "6"}
)


def test_mask_history_trains_only_the_last_answer(tok):
    [ex] = encode_supervised([MULTI], get_template("default", "lf-0.9"), tok, 1024, mask_history=True)
    [plain] = encode_supervised([MULTI], get_template("default", "lf-0.9"), tok, 1024)
    assert ex.input_ids == plain.input_ids
    answer = enc(tok, "6") + [2] + enc(tok, "\n")
    assert [t for t in ex.labels if t != M] == answer


def test_mask_history_needs_lf09_and_train_on_prompt_refuses_efficient_eos_there(tok):
    with pytest.raises(ChipspanError, match="--mask_history needs --template_revision lf-0.9"):
        encode_supervised([MULTI], get_template("default"), tok, 1024, mask_history=True)
    with pytest.raises(ChipspanError, match="template 'falcon' \\(lf-0.9\\) cannot train on the prompt"):
        encode_supervised([MULTI], get_template("falcon", "lf-0.9"), tok, 1024, train_on_prompt=True)


def test_train_on_prompt_labels_every_token(tok):
    [ex] = encode_supervised([MULTI], get_template("llama2"), tok, 1024, train_on_prompt=True)
    assert ex.labels == ex.input_ids


def test_default_system_flag(tok):
    template = get_template("llama2", "lf-0.5", default_system="Be short.")
    assert template.render([("user", "hi"), ("assistant", "yo")], "")[0][1].startswith("[INST] <<SYS>>\nBe short.")


def test_qwen3_adds_an_empty_thought_to_answers_without_one():
    template = get_template("qwen3", "lf-0.9")
    thought = "<think>\nx\n</think>\n\n"
    pieces = template.render([("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", thought + "b")], "")
    assert pieces[1] == ["<think>\n\n</think>\n\n", "a<|im_end|>\n"]
    assert pieces[3] == [thought + "b<|im_end|>\n"]  # it has one: kept
    masked = template.render(
        [("user", "q"), ("assistant", thought + "a"), ("user", "q2"), ("assistant", "b")], "", mask_history=True
    )
    assert masked[1] == ["a<|im_end|>\n"] and masked[3][0] == "<think>\n\n</think>\n\n"


def test_a_token_the_tokenizer_lacks_is_refused(tok):
    with pytest.raises(ChipspanError, match="template 'baichuan' needs the token <reserved_102>, which this"):
        encode_supervised([MULTI], get_template("baichuan"), tok, 1024)


def test_names_and_revisions():
    assert get_template("llama3", "lf-0.5").revision == "lf-0.9"  # only lf-0.9 has it
    with pytest.raises(ChipspanError, match="template 'ziya' is not in LLaMA-Factory 0.9"):
        get_template("ziya", "lf-0.9")
    with pytest.raises(ChipspanError, match="unknown template 'chatmk' \\(did you mean 'chatml'\\?\\)"):
        get_template("chatmk")


# ---- --template auto -------------------------------------------------------------------------------


def lf09_ids(folder: Path, name: str, rows: list, **options):
    tok = Tokenizer.from_folder(folder)
    template = get_template(name, "lf-0.9")
    fix_tokenizer(tok, template)
    return encode_supervised(rows, template, tok, 1024, **options)


SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # no final "."
# Meta-Llama-3-8B-Instruct's chat template (the Llama-3.2 tokenizer files here come without one).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def pairs(examples):
    return [(e.input_ids, e.labels) for e in examples]


def test_auto_on_smollm2_equals_lf09_chatml_and_smollm2(smollm2_dir):
    """SmolLM2's chat template is ChatML with its own default system prompt: on the fixture's alpaca
    rows (single and multi-turn) ``auto`` equals lf-0.9 ``chatml`` given that system prompt, and lf-0.9
    ``smollm2`` where the row has a system prompt (smollm2's default ends with a "." SmolLM2's lacks)."""
    rows = conversations(reference("lf-0.9"))[:5]
    tok = Tokenizer.from_folder(smollm2_dir)
    auto = get_template("auto", tokenizer=tok)
    chatml = get_template("chatml", "lf-0.9", default_system=SMOLLM2_SYSTEM)
    for options in ({}, {"mask_history": True}, {"train_on_prompt": True}):
        ours = pairs(encode_supervised(rows, auto, tok, 1024, **options))
        assert ours == pairs(encode_supervised(rows, chatml, Tokenizer.from_folder(smollm2_dir), 1024, **options))
        smollm2 = pairs(lf09_ids(smollm2_dir, "smollm2", rows, **options))
        assert [a == b for a, b in zip(ours, smollm2)] == [bool(row.system) for row in rows] == [0, 1, 0, 0, 0]
    assert pairs(encode_supervised(rows, auto, tok, 48)) == pairs(encode_supervised(rows, chatml, tok, 48))


def test_auto_on_llama3_equals_lf09_llama3(llama3_tokenizer_dir):
    """With Llama 3's chat template, ``auto`` equals lf-0.9 ``llama3``: each answer is trained with its
    <|eot_id|>, the header before it is not."""
    rows = conversations(reference("lf-0.9"))[:5]
    tok = Tokenizer.from_folder(llama3_tokenizer_dir)
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    ours = encode_supervised([*rows, MULTI], get_template("auto", tokenizer=tok), tok, 1024)
    assert pairs(ours) == pairs(lf09_ids(llama3_tokenizer_dir, "llama3", [*rows, MULTI]))
    eot = tok.token_to_id("<|eot_id|>")
    assert [t for t in ours[-1].labels if t != M] == enc(tok, "4") + [eot] + enc(tok, "6") + [eot]


def test_auto_refuses_a_template_that_rewrites_history(smollm2_dir):
    tok = Tokenizer.from_folder(smollm2_dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] if loop.last else 'x' }}{% endfor %}"
    with pytest.raises(ChipspanError, match="renders earlier turns differently"):
        encode_supervised([MULTI], get_template("auto", tokenizer=tok), tok, 1024)


def test_auto_needs_a_chat_template(tok):
    with pytest.raises(ChipspanError, match="--template auto: this tokenizer has no chat template"):
        get_template("auto", tokenizer=tok)
