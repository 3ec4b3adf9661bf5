"""Data: registry, formats, templates, SFT masking/truncation and PT blocks, as in LLaMA-Factory 0.5.

Expected ids are written from the Llama-2 tokenizer's encoding of each literal piece: every string
slot of a template is tokenized on its own, so each piece starts with its own "▁".
"""

import json
import logging
import shutil
import sys
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch
from helpers import DEMO_DATA, LLAMA2_TOKENIZER, command, run, torchrun

from chipspan.data import IGNORE_INDEX, Example, collate, load_examples
from chipspan.data.templates import get_template
from chipspan.errors import ChipspanError
from chipspan.models.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"
M = IGNORE_INDEX
BOS, EOS = 1, 2
ALPHABET = "k l m n o p q r s t u v w x y z"  # 16 tokens: ▁k ▁l ... ▁z
LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
    "being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, "
    "or illegal content. Please ensure that your responses are socially unbiased and positive in nature."
    "\n\nIf a question does not make any sense, or is not factually coherent, explain why instead of "
    "answering something not correct. If you don't know the answer to a question, please don't share "
    "false information."
)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_folder(LLAMA2_TOKENIZER)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def write_dataset(folder: Path, rows: list, name="toy", file_name="toy.json", columns=None, jsonl=False):
    """A dataset file plus a dataset_info.json entry for it in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows)
    (folder / file_name).write_text(text, encoding="utf-8")
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = {"file_name": file_name, **({"columns": columns} if columns else {})}
    info_path.write_text(json.dumps(info))


def encode_rows(tmp_path, tok, rows, template="default", cutoff_len=1024, columns=None, **kwargs):
    write_dataset(tmp_path, rows, columns=columns)
    return load_examples("toy", tmp_path, tok, template, cutoff_len=cutoff_len, **kwargs)


HISTORY = {"prompt": "instruction", "query": "input", "response": "output", "history": "history", "system": "system"}
HI = {"instruction": "hi", "input": "", "output": "Hello!"}
MULTI_TURN = {"system": "Be brief.", "history": [["2+2?", "4"]], "instruction": "and 3+3?", "output": "6"}


# ---- the default template ------------------------------------------------------------------------


def test_default_single_turn(tmp_path, tok):
    [ex] = encode_rows(tmp_path, tok, [HI])
    prompt = [12968, 29901, 7251, 13, 7900, 22137, 29901, 29871]  # ▁Human : ▁hi \n Ass istant : ▁
    assert prompt == enc(tok, "Human: hi\nAssistant: ")
    answer = [15043, 29991]  # ▁Hello !
    assert ex.input_ids == prompt + answer + [EOS]
    assert ex.labels == [M] * 8 + answer + [EOS]


def test_default_input_joins_instruction_with_a_newline(tmp_path, tok):
    [ex] = encode_rows(tmp_path, tok, [{"instruction": "Translate:", "input": "bonjour", "output": "hello"}])
    prompt = enc(tok, "Human: Translate:\nbonjour\nAssistant: ")
    assert ex.input_ids == prompt + enc(tok, "hello") + [EOS]


def test_default_multi_turn_with_system_and_history(tmp_path, tok):
    [ex] = encode_rows(tmp_path, tok, [MULTI_TURN], columns=HISTORY)
    # the system is a segment of its own; a "\n" separator segment comes before every later user turn
    turn1 = enc(tok, "Be brief.") + enc(tok, "Human: 2+2?\nAssistant: ")
    answer1 = enc(tok, "4") + [EOS]
    turn2 = enc(tok, "\n") + enc(tok, "Human: and 3+3?\nAssistant: ")
    answer2 = enc(tok, "6") + [EOS]
    assert enc(tok, "\n") == [29871, 13] and answer1 == [29871, 29946, EOS]
    assert ex.input_ids == turn1 + answer1 + turn2 + answer2
    assert ex.labels == [M] * len(turn1) + answer1 + [M] * len(turn2) + answer2  # every answer trained


def test_default_truncation_shares_the_budget(tmp_path, tok):
    long_answer = " ".join([ALPHABET] * 3)
    row = {"instruction": "a b c d e f g h i j", "input": "", "output": long_answer}
    [ex] = encode_rows(tmp_path, tok, [row], cutoff_len=40)
    prompt, answer = enc(tok, "Human: a b c d e f g h i j\nAssistant: "), enc(tok, long_answer) + [EOS]
    # s = 17, t = 48 + EOS = 49, cutoff 40: max_target = max(int(40 * 49/66), 16) = int(29.69) = 29,
    # max_source = 40 - 29 = 11; both cut from the right, so the answer loses its EOS.
    assert (len(prompt), len(answer)) == (17, 49)
    assert ex.input_ids == prompt[:11] + answer[:29]
    assert ex.labels == [M] * 11 + answer[:29]


def test_default_truncation_keeps_16_answer_tokens(tmp_path, tok):
    row = {"instruction": "a b c d e f g h i j", "input": "", "output": ALPHABET}
    [ex] = encode_rows(tmp_path, tok, [row], cutoff_len=20)
    prompt, answer = enc(tok, "Human: a b c d e f g h i j\nAssistant: "), enc(tok, ALPHABET) + [EOS]
    # s = 17, t = 17, cutoff 20: int(20 * 17/34) = 10 < 16, so max_target = 16, max_source = 4
    assert (len(prompt), len(answer)) == (17, 17)
    assert ex.input_ids == prompt[:4] + answer[:16]
    assert ex.labels == [M] * 4 + answer[:16]


def test_default_truncation_stops_adding_turns_at_cutoff(tmp_path, tok):
    row = {"history": [["a b c d e f g h i j", ALPHABET]], "instruction": "and 3+3?", "output": "6"}
    [ex] = encode_rows(tmp_path, tok, [row], cutoff_len=30, columns=HISTORY)
    prompt, answer = enc(tok, "Human: a b c d e f g h i j\nAssistant: "), enc(tok, ALPHABET) + [EOS]
    # turn 1: s = t = 17, remaining 30: max_target = max(int(30 * 17/34), 16) = 16, max_source = 14;
    # 30 tokens used, so turn 2 is not added at all.
    assert ex.input_ids == prompt[:14] + answer[:16]
    assert ex.labels == [M] * 14 + answer[:16]


def test_default_truncation_never_passes_cutoff(tmp_path, tok):
    row = {"history": [["a b c d e f g h i j", ALPHABET]], "instruction": "and 3+3?", "output": "6"}
    [ex] = encode_rows(tmp_path, tok, [row], cutoff_len=40, columns=HISTORY)
    first = enc(tok, "Human: a b c d e f g h i j\nAssistant: ") + enc(tok, ALPHABET) + [EOS]
    second = enc(tok, "\n") + enc(tok, "Human: and 3+3?\nAssistant: ")
    answer = enc(tok, "6") + [EOS]
    # turn 1 (17 + 17) fits whole: max_target = int(40 * 17/34) = 20. Turn 2: remaining 6, s = 15,
    # t = 3: LLaMA-Factory 0.5's max_target = max(int(6 * 3/18), 16) = 16 left max_source = 6 - 16 = -10,
    # which as a slice kept 5 prompt tokens (42 tokens, past cutoff_len). Here the answer takes
    # its 3 tokens and the prompt the other 3 of the 6 remaining: 34 + 3 + 3 = 40 tokens.
    assert (len(second), len(answer)) == (15, 3)
    assert ex.input_ids == first + second[:3] + answer
    assert ex.labels == [M] * 17 + first[17:] + [M] * 3 + answer


# ---- the llama2 template -------------------------------------------------------------------------


def test_llama2_default_system_prompt_is_metas():
    assert get_template("llama2").default_system == LLAMA2_SYSTEM


def test_llama2_single_turn_gets_the_default_system(tmp_path, tok):
    [ex] = encode_rows(tmp_path, tok, [HI], template="llama2")
    prompt = [BOS] + enc(tok, f"[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\nhi [/INST]")
    assert enc(tok, "[INST] hi [/INST]") == [518, 25580, 29962, 7251, 518, 29914, 25580, 29962]
    assert ex.input_ids == prompt + [15043, 29991, EOS]
    assert ex.labels == [M] * len(prompt) + [15043, 29991, EOS]


def test_llama2_multi_turn_folds_the_system_into_the_first_turn(tmp_path, tok):
    [ex] = encode_rows(tmp_path, tok, [MULTI_TURN], template="llama2", columns=HISTORY)
    turn1 = [BOS] + enc(tok, "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n2+2? [/INST]")
    turn2 = [BOS] + enc(tok, "[INST] and 3+3? [/INST]")  # no separator; BOS again
    answer1, answer2 = enc(tok, "4") + [EOS], enc(tok, "6") + [EOS]
    assert ex.input_ids == turn1 + answer1 + turn2 + answer2
    assert ex.labels == [M] * len(turn1) + answer1 + [M] * len(turn2) + answer2


def test_llama2_truncation(tmp_path, tok):
    row = {"instruction": "a b c d e f g h i j", "input": "", "output": " ".join([ALPHABET] * 3)}
    [ex] = encode_rows(tmp_path, tok, [row], template="llama2", cutoff_len=40, columns=HISTORY)
    prompt = [BOS] + enc(tok, f"[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\na b c d e f g h i j [/INST]")
    answer = enc(tok, " ".join([ALPHABET] * 3)) + [EOS]
    # s = 147 (Meta's system prompt is long), t = 49, cutoff 40: int(40 * 49/196) = 10 < 16, so
    # max_target = 16 and max_source = 24: the prompt keeps BOS + its first 23 tokens.
    assert (len(prompt), len(answer)) == (147, 49)
    assert ex.input_ids == prompt[:24] + answer[:16]
    assert ex.labels == [M] * 24 + answer[:16]


def test_matches_the_lf05_code_on_the_frozen_fixture(tmp_path, tok):
    """Ids and labels equal llmtuner 0.5.1's on 15 rows x 2 templates x 3 cutoffs (make_lf05_reference.py),
    except where LLaMA-Factory 0.5 went past cutoff_len: those rows are cut to fit instead."""
    fixture = json.loads((FIXTURES / "lf05_reference.json").read_text(encoding="utf-8"))
    write_dataset(tmp_path, fixture["rows"], columns=fixture["columns"])
    compared = over = 0
    for key, expected in fixture["expected"].items():
        template, cutoff = key.split("/")
        examples = load_examples("toy", tmp_path, tok, template, cutoff_len=int(cutoff))
        for ours, ids, labels in zip(examples, expected["input_ids"], expected["labels"]):
            if len(ids) > int(cutoff):
                over += 1
                assert len(ours.input_ids) <= int(cutoff), key
            else:
                compared += 1
                assert (ours.input_ids, ours.labels) == (ids, labels), key
    assert compared > over > 0  # both kinds of row are exercised


# ---- lf-0.9 names ----------------------------------------------------------------------------------


def test_chatml_replaces_eos_and_adds_its_tokens(tmp_path):
    tok = Tokenizer.from_folder(LLAMA2_TOKENIZER)  # fixing the tokenizer changes it: a fresh one
    [ex] = encode_rows(tmp_path, tok, [{"instruction": "hi", "output": "Hello!"}], template="chatml")
    im_end, im_start = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|im_start|>")
    assert (im_end, im_start, tok.eos_token_id, tok.pad_token_id) == (32000, 32001, 32000, 32000)
    prompt = enc(tok, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    answer = enc(tok, "Hello!<|im_end|>\n")
    assert prompt[0] == im_start and im_end in answer
    assert ex.input_ids == prompt + answer
    assert ex.labels == [M] * len(prompt) + answer


def test_empty_template_adds_nothing(tmp_path, tok):
    [ex] = encode_rows(tmp_path, tok, [{"instruction": "hi", "output": "Hello!"}], template="empty")
    assert ex.input_ids == enc(tok, "hi") + enc(tok, "Hello!")  # no EOS: LLaMA-Factory 0.9.5's empty
    assert ex.labels == [M] * len(enc(tok, "hi")) + enc(tok, "Hello!")


def test_unknown_template_lists_the_known_ones(tmp_path, tok):
    with pytest.raises(
        ChipspanError, match=r"unknown template 'llama3x' \(did you mean 'llama3'\?\): known templates are alp"
    ):
        encode_rows(tmp_path, tok, [{"instruction": "hi", "output": "x"}], template="llama3x")
    with pytest.raises(ChipspanError, match="template 'ziya' is not in LLaMA-Factory 0.9"):
        encode_rows(tmp_path, tok, [{"instruction": "hi", "output": "x"}], template="ziya", template_revision="lf-0.9")


# ---- rows and formats ------------------------------------------------------------------------------


def test_rows_that_cannot_be_used_are_dropped_and_counted(tmp_path, tok, caplog):
    rows = [
        {"instruction": "ok", "output": ""},  # an empty answer is kept (LLaMA-Factory 0.5 trained on EOS alone)
        {"instruction": None, "output": "x"},
        {"instruction": "no answer"},
        {"instruction": "two answers", "output": ["a", "b"]},
        {"instruction": "bad history", "output": "x", "history": "oops"},
    ]
    with caplog.at_level(logging.WARNING, logger="chipspan.data"):
        examples = encode_rows(tmp_path, tok, rows, columns=HISTORY)
    assert [e.input_ids for e in examples] == [enc(tok, "Human: ok\nAssistant: ") + [EOS]]
    assert "dropped 4 of 5 rows" in caplog.text and "instruction is missing (first: row 2)" in caplog.text


def test_columns_rename_and_unnamed_columns_are_ignored(tmp_path, tok):
    rows = [{"question": "hi", "input": "ignored", "answer": "yo"}]
    [ex] = encode_rows(tmp_path, tok, rows, columns={"prompt": "question", "response": "answer"})
    assert ex.input_ids == enc(tok, "Human: hi\nAssistant: ") + enc(tok, "yo") + [EOS]


def test_json_jsonl_csv_and_parquet_give_the_same_examples(tmp_path, tok):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    write_dataset(tmp_path / "json", rows)
    write_dataset(tmp_path / "jsonl", rows, file_name="toy.jsonl", jsonl=True)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "toy.csv").write_text(
        "instruction,input,output\n" + "".join(f"q{i},,a{i}\n" for i in range(5)), encoding="utf-8"
    )
    (tmp_path / "csv" / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "toy.csv"}}))
    (tmp_path / "parquet").mkdir()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "parquet" / "toy.parquet")
    (tmp_path / "parquet" / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "toy.parquet"}}))
    loaded = [load_examples("toy", tmp_path / kind, tok) for kind in ("json", "jsonl", "csv", "parquet")]
    assert len(loaded[0]) == 5 and loaded[0] == loaded[1] == loaded[2] == loaded[3]


def test_parquet_without_pyarrow_says_so(tmp_path, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "toy.parquet").write_bytes(b"PAR1")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "toy.parquet"}}))
    with pytest.raises(ChipspanError, match="reading Parquet needs pyarrow: pip install pyarrow"):
        load_examples("toy", tmp_path, tok)


def test_dataset_lists_concatenate_in_order_with_max_samples_each(tmp_path, tok):
    for name in ("a", "b"):
        rows = [{"instruction": f"{name}{i}", "output": "x"} for i in range(5)]
        write_dataset(tmp_path, rows, name=name, file_name=f"{name}.json")
    examples = load_examples("b, a", tmp_path, tok, max_samples=2)
    answer = enc(tok, "x") + [EOS]
    expected = [enc(tok, f"Human: {p}\nAssistant: ") + answer for p in ("b0", "b1", "a0", "a1")]
    assert [e.input_ids for e in examples] == expected


# ---- the registry ----------------------------------------------------------------------------------


def test_unknown_dataset_lists_close_matches(tmp_path, tok):
    with pytest.raises(ChipspanError, match="unknown dataset 'x_gpt4_zh'; close matches: alpaca_gpt4_zh"):
        load_examples("x_gpt4_zh", tmp_path, tok)


def test_missing_lf05_file_says_what_it_is_and_where_it_was_looked_for(tmp_path, tok):
    with pytest.raises(ChipspanError) as info:
        load_examples("alpaca_gpt4_zh", tmp_path, tok)
    message = str(info.value)
    assert "\n" not in message
    assert f"looked for {tmp_path.absolute() / 'alpaca_gpt4_data_zh.json'}" in message
    for fact in ("48,818", "CC BY-NC", "GPT-4-LLM", "LLaMA-Factory's data/ folder"):
        assert fact in message


def test_sha1_mismatch_warns_once_and_loads(tmp_path, tok, caplog):
    rows = [{"instruction": "hi", "input": "", "output": "yo"}]
    (tmp_path / "alpaca_gpt4_data_zh.json").write_text(json.dumps(rows), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="chipspan.data"):
        examples = load_examples("alpaca_gpt4_zh", tmp_path, tok)  # the built-in entry, its sha1 differs
    assert len(examples) == 1
    [record] = [r for r in caplog.records if "SHA-1" in r.getMessage()]
    assert "3eaa3bda364ccdd59925d7448a698256c31ef845" in record.getMessage()


def test_user_entries_replace_builtin_ones(tmp_path, tok):
    write_dataset(
        tmp_path,
        [{"q": "hi", "a": "yo"}],
        name="alpaca_gpt4_zh",
        file_name="mine.json",
        columns={"prompt": "q", "response": "a"},
    )
    [ex] = load_examples("alpaca_gpt4_zh", tmp_path, tok)
    assert ex.input_ids == enc(tok, "Human: hi\nAssistant: ") + enc(tok, "yo") + [EOS]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"hf_hub_url": "org/data"}, r"dataset 'toy' is on the Hugging Face Hub \(org/data\)"),
        ({"script_url": "toy"}, "dataset 'toy' comes from a loading script"),
        ({"file_name": "x.json", "formatting": "ranking"}, "formatting 'ranking', which is not supported"),
        ({"file_name": "x.arrow"}, r"cannot read \.arrow files"),
    ],
)
def test_unsupported_entries_say_so(tmp_path, tok, entry, message):
    (tmp_path / "x.arrow").write_text("")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"toy": entry}))
    with pytest.raises(ChipspanError, match=message):
        load_examples("toy", tmp_path, tok)


def test_lf05_registry_entry_reads_history_and_checks_the_sha1(tmp_path, tok, caplog):
    """The built-in oaast_sft_zh entry maps instruction/input/output/history; a file that is not
    LLaMA-Factory 0.5's (its SHA-1 differs from the registry's) is used with a warning."""
    rows = [{"instruction": "q2", "input": "", "output": "a2", "history": [["q1", "a1"]]}]
    (tmp_path / "oaast_sft_zh.json").write_text(json.dumps(rows), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        (example,) = load_examples("oaast_sft_zh", tmp_path, tok)
    assert "does not match file_sha1 a6a91f18" in caplog.text
    prompt = lambda text: enc(tok, f"Human: {text}\nAssistant: ")  # noqa: E731
    answer = lambda text: enc(tok, text) + [EOS]  # noqa: E731
    newline = enc(tok, "\n")
    assert example.input_ids == prompt("q1") + answer("a1") + newline + prompt("q2") + answer("a2")
    assert example.labels == ([M] * len(prompt("q1")) + answer("a1") + [M] * len(newline + prompt("q2")) + answer("a2"))


# ---- data chipspan cannot use: refused in one line, never dropped -------------------------------------

TEXT_ONLY = (
    "chipspan trains text models only and would drop them: remove the column from the entry and the rows "
    "(placeholders such as <image> in the text then stay plain text) or pick a text dataset"
)
SAVE_AS_FILE = "save the data as a JSON/JSONL file and register it with file_name"
ONE_ANSWER = "pick a dataset with one answer to learn per row for --stage"
# Entries chipspan cannot use; their files are never written: each is refused before a file is looked for.
UNUSABLE = {
    "pictures": {"file_name": "pictures.json", "columns": {"prompt": "instruction", "images": "pics"}},
    "ranked": {"file_name": "ranked.json", "ranking": True},
    "graded": {"file_name": "graded.json", "formatting": "sharegpt", "columns": {"kto_tag": "label"}},
    "cloud": {"cloud_file_name": "s3://bucket/data.json"},
    "modelers": {"om_hub_url": "org/data"},
    "bucket": {"file_name": "gs://bucket/data.json"},
}
REFUSALS = {
    "pictures": f"dataset 'pictures' maps media columns (images -> 'pics'): {TEXT_ONLY}",
    "ranked": "dataset 'ranked' is a ranking dataset (\"ranking\": true: chosen and rejected answers), data for "
    "the rm and dpo stages (dpo with its orpo and simpo losses), which chipspan does not run yet: "
    f"{ONE_ANSWER} sft",
    "graded": "dataset 'graded' labels its answers desirable or undesirable (a kto_tag column), data for the kto "
    f"stage, which chipspan does not run yet: {ONE_ANSWER} sft",
    "cloud": "dataset 'cloud' is in cloud storage (S3 or Google Cloud Storage), which chipspan does not read "
    f"from (cloud_file_name 's3://bucket/data.json'): {SAVE_AS_FILE}",
    "modelers": "dataset 'modelers' is on Modelers (the OpenMind hub), which chipspan does not load from "
    f"(om_hub_url 'org/data'): {SAVE_AS_FILE}",
    "bucket": "dataset 'bucket' in {registry}: file_name 'gs://bucket/data.json' is a URL and chipspan reads "
    "local files: download it into --dataset_dir and name it by its path inside that folder",
}


@pytest.fixture
def unusable_dir(tmp_path):
    """A dataset folder whose dataset_info.json registers the ``UNUSABLE`` entries, and no data file."""
    (tmp_path / "dataset_info.json").write_text(json.dumps(UNUSABLE))
    return tmp_path


def refusal(name, folder):
    return REFUSALS[name].format(registry=folder.absolute() / "dataset_info.json")


@pytest.mark.parametrize("name", list(UNUSABLE))
def test_entries_chipspan_cannot_use_are_refused_before_a_file_is_looked_for(unusable_dir, tok, name):
    with pytest.raises(ChipspanError) as caught:
        load_examples(name, unusable_dir, tok)
    assert str(caught.value) == refusal(name, unusable_dir)


def test_ranking_and_kto_datasets_are_refused_under_pt_too(unusable_dir, tok):
    for name in ("ranked", "graded"):
        with pytest.raises(ChipspanError) as caught:
            load_examples(name, unusable_dir, tok, stage="pt")
        assert str(caught.value) == refusal(name, unusable_dir).replace("--stage sft", "--stage pt")


def test_every_datasets_problems_come_out_in_one_line(unusable_dir, tok):
    """A usable dataset among them is not read: nothing is, until every name is fine."""
    write_dataset(unusable_dir, [{"instruction": "hi", "output": "yo"}])
    with pytest.raises(ChipspanError) as caught:
        load_examples("pictures,toy,ranked,nope,bucket", unusable_dir, tok)
    unknown = (
        f"unknown dataset 'nope': add it to {unusable_dir.absolute() / 'dataset_info.json'} or use a name "
        "LLaMA-Factory 0.5's registry has"
    )
    problems = [refusal("pictures", unusable_dir), refusal("ranked", unusable_dir), unknown]
    problems.append(refusal("bucket", unusable_dir))
    assert str(caught.value) == "problems with 4 datasets: " + "; ".join(
        f"({i}) {p}" for i, p in enumerate(problems, 1)
    )


def test_an_entry_with_several_problems_names_each(tmp_path, tok):
    entry = {**UNUSABLE["pictures"], "ranking": True}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"pictures": entry}))
    with pytest.raises(ChipspanError) as caught:
        load_examples("pictures", tmp_path, tok)
    ranked = refusal("ranked", tmp_path).replace("'ranked'", "'pictures'")
    assert str(caught.value) == f"{refusal('pictures', tmp_path)}; {ranked}"


def test_missing_files_of_several_datasets_come_out_together(tmp_path, tok):
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}})
    )
    with pytest.raises(
        ChipspanError,
        match=r"^problems with 2 datasets: \(1\) dataset 'a': file a\.json not found .*; \(2\) dataset 'b': file b\.json not found",
    ):
        load_examples("a,b", tmp_path, tok)


@pytest.mark.parametrize("offline", [False, True])
@pytest.mark.parametrize(
    "dataset_dir, message",
    [
        (
            "ONLINE",
            "--dataset_dir ONLINE reads every dataset name as a Hub dataset, which chipspan does not do: register "
            "each dataset in a local dataset_info.json (hf_hub_url or file_name) and pass its folder",
        ),
        (
            "REMOTE:org/data",
            "--dataset_dir REMOTE:org/data reads dataset_info.json from a Hugging Face Hub dataset repository, "
            "which chipspan does not do: download the data into a folder here and pass it as --dataset_dir "
            "(huggingface-cli download --repo-type dataset org/data --local-dir DIR)",
        ),
        (
            "s3://bucket/data",
            "--dataset_dir s3://bucket/data is a URL and chipspan reads local folders: download the data into a "
            "folder here and pass it as --dataset_dir",
        ),
    ],
)
def test_remote_dataset_dirs_are_refused_online_or_not(tok, monkeypatch, dataset_dir, message, offline):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ChipspanError) as caught:
        load_examples("alpaca_gpt4_zh", dataset_dir, tok)
    assert str(caught.value) == message


def test_a_row_with_media_is_refused_where_it_is_not_dropped(tmp_path, tok):
    rows = [
        {"instruction": "hi", "output": "yo"},
        {"instruction": "<image>what is it?", "output": "a cat", "images": ["cat.png"]},
    ]
    write_dataset(tmp_path, rows, jsonl=True)
    with pytest.raises(ChipspanError) as caught:
        load_examples("toy", tmp_path, tok)
    assert str(caught.value) == f"dataset 'toy' line 2 has images (['cat.png']): {TEXT_ONLY}"

    chat = {
        "conversations": [{"from": "human", "value": "<video>and?"}, {"from": "gpt", "value": "ok"}],
        "videos": "v.mp4",
    }
    (tmp_path / "chat.json").write_text(json.dumps([chat]))
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"chat": {"file_name": "chat.json", "formatting": "sharegpt"}})
    )
    with pytest.raises(ChipspanError) as caught:
        load_examples("chat", tmp_path, tok)
    assert str(caught.value) == f"dataset 'chat' row 1 has videos (v.mp4): {TEXT_ONLY}"


def test_text_that_only_mentions_media_trains_as_text(tmp_path, tok):
    """Empty media columns, null media/kto_tag mappings and ranking: false are a text dataset; a
    column named images that the entry reads as the prompt is text too."""
    rows = [
        {"instruction": "draw <image>", "output": "no", "images": []},
        {"instruction": "say <audio>", "output": "ok", "audios": None, "videos": ""},
    ]
    write_dataset(
        tmp_path, rows, columns={"prompt": "instruction", "response": "output", "images": None, "kto_tag": None}
    )
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    info["toy"]["ranking"] = False
    info["captions"] = {"file_name": "captions.json", "columns": {"prompt": "images", "response": "output"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    (tmp_path / "captions.json").write_text(json.dumps([{"images": "a red square", "output": "red"}]))
    first, second, caption = load_examples("toy,captions", tmp_path, tok)
    assert first.input_ids == enc(tok, "Human: draw <image>\nAssistant: ") + enc(tok, "no") + [EOS]
    assert second.input_ids == enc(tok, "Human: say <audio>\nAssistant: ") + enc(tok, "ok") + [EOS]
    assert caption.input_ids == enc(tok, "Human: a red square\nAssistant: ") + enc(tok, "red") + [EOS]


def _refused_train_flags(workspace, unusable_dir, out):
    """``command``'s LoRA run of ``workspace``'s model over the ranking dataset of ``unusable_dir``."""
    argv = command(workspace, out, "lora")
    argv[argv.index("--dataset") + 1] = "ranked"
    argv[argv.index("--dataset_dir") + 1] = str(unusable_dir)
    return argv


def test_train_and_data_refuse_before_the_model_loads_and_write_nothing(
    tiny_workspace, unusable_dir, no_weight_loading, capsys
):
    from chipspan import cli

    out = unusable_dir / "out"
    with pytest.raises(ChipspanError) as caught:
        run(_refused_train_flags(tiny_workspace, unusable_dir, out))
    assert str(caught.value) == refusal("ranked", unusable_dir)
    assert not out.exists()

    flags = ["data", "--model_name_or_path", str(tiny_workspace / "model"), "--dataset", "ranked"]
    flags += ["--dataset_dir", str(unusable_dir), "--template", "default", "--out", str(out / "data.jsonl")]
    assert cli.main(flags) == 1
    assert capsys.readouterr().err == f"chipspan: error: {refusal('ranked', unusable_dir)}\n"
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torchrun_ranks_refuse_the_same_way(tiny_workspace, unusable_dir):
    out = unusable_dir / "out"
    argv = _refused_train_flags(tiny_workspace, unusable_dir, out)[1:]
    result = torchrun("-m", "chipspan", "train", *argv, succeed=False)
    assert f"chipspan: error: {refusal('ranked', unusable_dir)}" in result.stderr
    assert not out.exists()


# ---- pre-training ----------------------------------------------------------------------------------


def test_pt_blocks(tmp_path, tok):
    rows = [{"text": "a b c"}, {"text": "d e"}]
    write_dataset(tmp_path, rows, columns={"prompt": "text"}, file_name="t.jsonl", jsonl=True)
    examples = load_examples("toy", tmp_path, tok, template=None, stage="pt", cutoff_len=3)
    # a b c </s> d e </s> (no BOS), cut into blocks of 3; the last token is a remainder, dropped.
    assert enc(tok, "a b c") == [263, 289, 274] and enc(tok, "d e") == [270, 321]
    assert [e.input_ids for e in examples] == [[263, 289, 274], [EOS, 270, 321]]
    # LLaMA-Factory 0.5's collator masked pad ids (= EOS here), so EOS was never a target; we train on it
    assert [e.labels for e in examples] == [[263, 289, 274], [EOS, 270, 321]]


def test_pt_blocks_do_not_cross_1000_row_batches(tmp_path, tok):
    write_dataset(tmp_path, [{"text": "a"}] * 1001, columns={"prompt": "text"})
    examples = load_examples("toy", tmp_path, tok, template=None, stage="pt", cutoff_len=3)
    # rows 1-1000 give 2000 tokens (a </s> each): 666 blocks, 2 dropped; row 1001 gives 2 < 3: none
    assert len(examples) == 666


def test_pt_from_a_text_file(tmp_path, tok):
    (tmp_path / "wiki.txt").write_text("a b\nc\n", encoding="utf-8")
    entry = {"file_name": "wiki.txt", "columns": {"prompt": "text"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"toy": entry}))
    [ex] = load_examples("toy", tmp_path, tok, stage="pt", cutoff_len=5)
    assert ex.input_ids == enc(tok, "a b") + [EOS] + enc(tok, "c") + [EOS]


# ---- collate ---------------------------------------------------------------------------------------


def test_collate_pads_right_to_a_multiple_of_8():
    batch = collate([Example([5] * 5, [M, M, 5, 5, 5]), Example([7] * 11, [7] * 11)], pad_id=0)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert all(v.shape == (2, 16) for v in batch.values())
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"][0].tolist() == [5] * 5 + [0] * 11
    assert batch["labels"][0].tolist() == [M, M, 5, 5, 5] + [M] * 11
    assert batch["attention_mask"].sum(1).tolist() == [5, 11]
    assert collate([Example([1] * 16, [1] * 16)], pad_id=0)["input_ids"].shape == (1, 16)
    unpadded = collate([Example([1] * 5, [1] * 5)], pad_id=0, pad_to_multiple_of=None)
    assert unpadded["input_ids"].shape == (1, 5)


def test_shared_demo_data_with_the_lf05_command_names(tmp_path, tok):
    """LLaMA-Factory 0.5's command (--dataset alpaca_gpt4_zh --template default) on the 1,000-row stand-in."""
    demo = DEMO_DATA / "alpaca_zh_demo.json"
    shutil.copy(demo, tmp_path / "alpaca_gpt4_data_zh.json")
    examples = load_examples("alpaca_gpt4_zh", tmp_path, tok, "default")
    assert len(examples) == 1000
    batch = collate(examples[:4], tok.pad_token_id)
    assert batch["input_ids"].shape[1] % 8 == 0 and (batch["labels"] != M).any()
