"""A chat template from a model folder is untrusted: what it may build, how long it may run, how deep it
may recurse and what it may read are bounded, and passing a bound is one error line naming the file."""

import json
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from helpers import LLAMA2_TOKENIZER

from chipspan.errors import ChipspanError
from chipspan.models import chat_sandbox
from chipspan.models.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
# Bombs seen in the wild: a 300 MB string (doubled 28 times), and nested loops that never end.
STRING_BOMB = (
    "{% set ns = namespace(s='x') %}{% for i in range(28) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
)
NESTED_LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"


# A dict literal is not checked when it is made (it is bounded by the source), only when it is used.
DICT_OF_100MB = "{% set s = 'x' * 1000000 %}{% set d = {" + ", ".join(f"'{k}': s" for k in range(100)) + "} %}"


def _model(folder: Path, template) -> Path:
    """A copy of the Llama-2 tokenizer whose tokenizer_config.json holds ``template``, and a toy dataset."""
    shutil.copytree(LLAMA2_TOKENIZER, folder / "model")
    config = json.loads((folder / "model" / "tokenizer_config.json").read_text())
    (folder / "model" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    (folder / "data").mkdir()
    (folder / "data" / "toy.json").write_text(json.dumps([{"instruction": "hi", "output": "Hello!"}] * 2))
    (folder / "data" / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "toy.json"}}))
    return folder / "model"


def _limit_memory():
    limit = 3 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.multiprocess
@pytest.mark.parametrize("template", [STRING_BOMB, NESTED_LOOPS], ids=["300MB-string", "nested-loops"])
def test_template_bomb_is_one_line_under_a_memory_limit(tmp_path, template):
    """`chipspan data --template auto` under a 3 GiB address-space limit: refused in seconds, one line."""
    model = _model(tmp_path, template)
    command = [
        sys.executable,
        "-m",
        "chipspan",
        "data",
        "--model_name_or_path",
        str(model),
        "--dataset",
        "toy",
        "--dataset_dir",
        str(tmp_path / "data"),
        "--template",
        "auto",
    ]
    start = time.monotonic()
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        preexec_fn=_limit_memory,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert time.monotonic() - start < 20
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert f"chat template in {model / 'tokenizer_config.json'} was stopped" in lines[0]
    assert ("8,000,000 characters" in lines[0]) if template == STRING_BOMB else ("1,000,000 steps" in lines[0])


def _refusal(template: str) -> str:
    """The error of rendering ``template``, which must come within the time limit and before the template
    holds more than 64 MB (what it would build is far more)."""
    tokenizer = Tokenizer.from_folder(LLAMA2_TOKENIZER)
    tokenizer.chat_template = template
    start = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(ChipspanError) as info:
            tokenizer.apply_chat_template(MESSAGES)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 2 * chat_sandbox.MAX_SECONDS and peak < 64 * 2**20
    return str(info.value)


@pytest.mark.parametrize(
    "template, limit",
    [
        ("{{ 'x' * 300000000 }}", "8,000,000 characters"),
        ("{{ 'x'|center(1000000000) }}", "8,000,000 characters"),
        ("{{ 'x'.ljust(1000000000) }}", "8,000,000 characters"),
        ("{{ '{:>1000000000}'.format(1) }}", "8,000,000 characters"),
        ("{{ '%1000000000d' % 1 }}", "8,000,000 characters"),
        ("{% set s = 'x' * 1000000 %}{{ s.replace('', s) }}", "8,000,000 characters"),
        ("{{ range(100000)|map('center', 1000000)|join }}", "8,000,000 characters"),
        ("{{ messages|tojson(indent=1000000000) }}", "8,000,000 characters"),
        ("{% set l = ['x' * 1000000] * 100 %}{{ l }}", "8,000,000 characters"),
        (DICT_OF_100MB + "{{ d.values() }}", "8,000,000 characters"),
        (DICT_OF_100MB + "{{ ''.join(d.values()) }}", "8,000,000 characters"),
        ("{{ 7 ** 100000 }}", "10,000 bits"),
        ("{% for i in range(10**9) %}{% endfor %}", "range of more than 100,000"),
        (
            "{% set x %}{% for i in range(100000) %}{% for j in range(10) %}" + "y" * 1000 + "{% endfor %}{% endfor %}"
            "{% endset %}",
            "32,000,000 characters of text",
        ),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "deeper than 64"),
        ("{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}", "deeper than 64"),
        ("{% for a in messages * 1000 %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "1,000,000 steps"),
    ],
    ids=[
        "repeat",
        "center",
        "ljust",
        "format-width",
        "percent-width",
        "replace",
        "join-map",
        "tojson-indent",
        "list-repeat",
        "dict-view",
        "dict-view-join",
        "power",
        "range",
        "literal-loop",
        "recursion",
        "recursive-loop",
        "steps",
    ],
)
def test_template_limits(template, limit):
    message = _refusal(template)
    assert "was stopped" in message and limit in message and "\n" not in message


@pytest.mark.parametrize(
    "tag",
    [
        "{% include 'secret.txt' %}",
        "{% import 'macros.j2' as m %}",
        "{% from 'macros.j2' import f %}",
        "{% extends 'base.j2' %}",
    ],
)
def test_template_cannot_read_files(tmp_path, tag):
    tokenizer = Tokenizer.from_folder(_model(tmp_path, "hi " + tag))
    with pytest.raises(ChipspanError) as info:
        tokenizer.apply_chat_template(MESSAGES)
    file = tmp_path / "model" / "tokenizer_config.json"
    assert f"chat template in {file} was stopped" in str(info.value)
    assert "may not read other files" in str(info.value) and "line 1" in str(info.value)


def test_template_errors_are_one_line_not_a_traceback():
    assert "failed (ZeroDivisionError" in _refusal("{{ 1 / 0 }}")
    assert "failed (TypeError" in _refusal("{{ 'a' + 1 }}")


def test_template_source_length_is_bounded():
    assert "longer than 1,000,000 characters" in _refusal("x" * (chat_sandbox.MAX_SOURCE_CHARS + 1))


def test_a_long_conversation_renders_in_full():
    """The bounds leave room for real work: 2,000 messages of 1,000 characters each render exactly."""
    tokenizer = Tokenizer.from_folder(LLAMA2_TOKENIZER)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|' ~ m.role ~ '|>' }}{{ m.content | trim }}"
        "{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"
    )
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"{i:04d}" + "x" * 996} for i in range(2000)]
    text = tokenizer.apply_chat_template(messages)
    assert text == "\n".join(f"<|{m['role']}|>{m['content']}" for m in messages)
