"""Tokenizer: ids, decoding, chat templates and saved files agree with transformers' AutoTokenizer."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import LLAMA2_TOKENIZER
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chipspan.errors import ChipspanError
from chipspan.models.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "",
    " ",
    "  leading and trailing spaces  ",
    "runs    of  spaces\tand\t\ttabs\n\n\nnewlines\r\n",
    "你好，世界！今天天气很好。请把这段话翻译成英文。",
    "12345 67890 3.14159 1,000,000 2024-02-29",
    "Mixed 中文 and English, 混合 text 123",
    "special <s> and </s> inside text, <unk> too",
    "<|begin_of_text|>llama3 specials<|eot_id|><|start_header_id|>user<|end_header_id|>",
    "emoji 🙂🚀 and accents: café, naïve, Ångström",
    "def f(x):\n    return x ** 2  # code\n",
]

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi! 你好"},
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "What is 2 + 2?\nAnswer briefly."},
]

# ChatML written one tag a line: only trim_blocks + lstrip_blocks (as in transformers) render it right.
CHATML = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

# Some templates mark assistant text with {% generation %} (for assistant-token masks).
GENERATION_TAG = (
    "{% for m in messages %}{% if m.role == 'assistant' %}"
    "{% generation %}[{{ m.content }}]{% endgeneration %}"
    "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
)

# A Llama-3-style template exercising what Hub templates use: bos_token, namespace-free loops with
# loop controls, trim/lstrip of blocks, tojson on tools, strftime_now, raise_exception.
LLAMA3_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You may call these functions:\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('roles must be user or assistant after the system message') }}
    {%- endif %}
    {%- if message['content'] == '' %}{% continue %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city, <in °C>",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(params=["llama2", "llama3"])
def folder(request):
    """The real Llama-2 tokenizer (in ../shared) and the Llama-3 one (fetched from PyPI, cached)."""
    return LLAMA2_TOKENIZER if request.param == "llama2" else request.getfixturevalue("llama3_tokenizer_dir")


@pytest.fixture(scope="module")
def auto_tokenizer():
    transformers = pytest.importorskip("transformers")
    cache = {}

    def load(folder):
        key = str(folder)
        if key not in cache:
            cache[key] = transformers.AutoTokenizer.from_pretrained(key)
        return cache[key]

    return load


def _copy(src: Path, dst: Path, config: dict | None = None, drop: tuple = ()) -> Path:
    """A copy of a tokenizer folder with tokenizer_config.json keys replaced (None removes a key)."""
    shutil.copytree(src, dst)
    path = dst / "tokenizer_config.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    for key, value in (config or {}).items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    for name in drop:
        (dst / name).unlink()
    return dst


# ---- ids and text -------------------------------------------------------------------------------


def test_encode_decode_match_transformers(folder, auto_tokenizer):
    ours, ref = Tokenizer.from_folder(folder), auto_tokenizer(folder)
    assert ours.vocab_size == len(ref)
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id) == (
        ref.bos_token_id,
        ref.eos_token_id,
        ref.unk_token_id,
    )
    for text in TEXTS:
        for special in (False, True):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.encode_batch(TEXTS, add_special_tokens=True) == [ours.encode(t, True) for t in TEXTS]
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
    assert set(ours.all_special_ids) >= {ours.bos_token_id, ours.eos_token_id}


def test_llama2_specials_and_pad_is_eos():
    tok = Tokenizer.from_folder(LLAMA2_TOKENIZER)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size, len(tok)) == (1, 2, 32000, 32000)
    assert tok.pad_token == "</s>" and tok.pad_token_id == 2 and tok.pad_is_eos
    assert tok.encode("", add_special_tokens=True) == [1]
    assert tok.encode("hi", add_special_tokens=True)[0] == 1
    assert tok.token_to_id("</s>") == 2 and tok.id_to_token(1) == "<s>"
    ids = tok.encode("a </s> b")
    assert 2 in ids and "</s>" not in tok.decode(ids) and "</s>" in tok.decode(ids, skip_special_tokens=False)


def test_llama3_has_its_own_pad(llama3_tokenizer_dir):
    tok = Tokenizer.from_folder(llama3_tokenizer_dir)
    assert tok.pad_token == "<|finetune_right_pad_id|>" and not tok.pad_is_eos
    assert tok.encode("hi", add_special_tokens=True)[0] == tok.bos_token_id == 128000


def test_add_eos_token_and_dict_special_tokens(tmp_path):
    folder = _copy(LLAMA2_TOKENIZER, tmp_path / "t", {"add_eos_token": True, "eos_token": None})
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False, "normalized": False}})
    )
    tok = Tokenizer.from_folder(folder)
    assert tok.eos_token == "</s>"
    ids = tok.encode("Hello", add_special_tokens=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.encode("Hello") == ids[1:-1]


def test_special_token_missing_from_vocab_is_added(tmp_path, auto_tokenizer):
    folder = _copy(LLAMA2_TOKENIZER, tmp_path / "t", {"pad_token": "<pad>"})
    tok, ref = Tokenizer.from_folder(folder), auto_tokenizer(folder)
    assert tok.vocab_size == len(ref) == 32001
    assert tok.pad_token_id == ref.pad_token_id == 32000 and not tok.pad_is_eos
    assert tok.encode("x<pad>y") == ref.encode("x<pad>y", add_special_tokens=False)


# ---- chat templates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template", [CHATML, LLAMA3_STYLE, GENERATION_TAG], ids=["chatml", "llama3-style", "generation-tag"]
)
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_matches_transformers(folder, template, generation_prompt, auto_tokenizer):
    ours, ref = Tokenizer.from_folder(folder), auto_tokenizer(folder)
    ours.chat_template = template
    for extra in ({"date_string": "26 Jul 2024"}, {"date_string": "1 Jan 2025", "tools": TOOLS}):
        got = ours.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt, **extra)
        want = ref.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template, **extra
        )
        assert got == want


def test_chatml_renders_exactly():
    tok = Tokenizer.from_folder(LLAMA2_TOKENIZER)
    tok.chat_template = CHATML
    assert tok.apply_chat_template(MESSAGES[1:3], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi! 你好<|im_end|>\n"
        "<|im_start|>assistant\nHello, how can I help?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_strftime_now_renders_today():
    tok = Tokenizer.from_folder(LLAMA2_TOKENIZER)
    tok.chat_template = "{{ strftime_now('%Y') }}"
    assert tok.apply_chat_template([]).isdigit()


def test_chat_template_sources(tmp_path):
    plain = _copy(LLAMA2_TOKENIZER, tmp_path / "plain", {"chat_template": CHATML})
    assert Tokenizer.from_folder(plain).chat_template == CHATML
    templates = [
        {"name": "default", "template": CHATML},
        {"name": "tool_use", "template": "tools: {{ tools | length }}"},
    ]
    named = _copy(LLAMA2_TOKENIZER, tmp_path / "named", {"chat_template": templates})
    tok = Tokenizer.from_folder(named)
    assert tok.apply_chat_template(MESSAGES[:2]).startswith("<|im_start|>system\n")
    assert tok.apply_chat_template(MESSAGES[:2], tools=TOOLS) == "tools: 1"
    jinja_file = _copy(LLAMA2_TOKENIZER, tmp_path / "file", {"chat_template": "from the config"})
    (jinja_file / "chat_template.jinja").write_text(LLAMA3_STYLE)
    assert Tokenizer.from_folder(jinja_file).chat_template == LLAMA3_STYLE


def test_unsafe_template_is_stopped():
    tok = Tokenizer.from_folder(LLAMA2_TOKENIZER)
    jinja2 = pytest.importorskip("jinja2")
    unsafe = ("{{ ''.__class__.__mro__ }}", "{{ messages.append(1) }}", "{{ cycler.__init__.__globals__ }}")
    for template in unsafe:
        tok.chat_template = template
        with pytest.raises(ChipspanError, match="unsafe") as info:
            tok.apply_chat_template(MESSAGES)
        assert isinstance(info.value.__cause__, jinja2.exceptions.SecurityError)


def test_chat_template_errors(tmp_path):
    tok = Tokenizer.from_folder(LLAMA2_TOKENIZER)
    assert tok.chat_template is None
    with pytest.raises(ChipspanError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)
    tok.chat_template = LLAMA3_STYLE
    with pytest.raises(ChipspanError, match="roles must be user or assistant"):
        tok.apply_chat_template(MESSAGES + [{"role": "tool", "content": "{}"}], date_string="x")
    tok.chat_template = "{% for m in messages %}{{ m }"
    with pytest.raises(ChipspanError, match="does not parse"):
        tok.apply_chat_template(MESSAGES)
    tok.chat_template = {"chatml": CHATML}
    with pytest.raises(ChipspanError, match="none named 'default'"):
        tok.apply_chat_template(MESSAGES)


# ---- saving and folder errors --------------------------------------------------------------------


def test_save_round_trip_loads_in_transformers(folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_folder(folder)
    tok.chat_template = LLAMA3_STYLE
    tok.save(tmp_path / "out")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    again = Tokenizer.from_folder(tmp_path / "out")
    assert len(ref) == again.vocab_size == tok.vocab_size
    assert ref.pad_token_id == again.pad_token_id == tok.pad_token_id
    assert again.pad_is_eos == tok.pad_is_eos
    for text in TEXTS:
        for special in (False, True):
            ids = tok.encode(text, add_special_tokens=special)
            assert ref.encode(text, add_special_tokens=special) == again.encode(text, special) == ids
    kwargs = {"add_generation_prompt": True, "date_string": "26 Jul 2024"}
    want = ref.apply_chat_template(MESSAGES, tokenize=False, **kwargs)
    assert again.apply_chat_template(MESSAGES, **kwargs) == want


def test_saved_add_eos_token_survives_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_folder(_copy(LLAMA2_TOKENIZER, tmp_path / "t", {"add_eos_token": True}))
    tok.save(tmp_path / "out")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert ref.encode("Hello") == tok.encode("Hello", add_special_tokens=True) == [1, 15043, 2]


def test_missing_folder(tmp_path):
    with pytest.raises(ChipspanError, match="does not exist"):
        Tokenizer.from_folder(tmp_path / "nope")


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ChipspanError, match="no tokenizer.json") as info:
        Tokenizer.from_folder(tmp_path)
    assert "only tokenizer.model" not in str(info.value)
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(ChipspanError, match="only tokenizer.model.*save_pretrained"):
        Tokenizer.from_folder(tmp_path)


def test_broken_config_json(tmp_path):
    folder = _copy(LLAMA2_TOKENIZER, tmp_path / "t")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ChipspanError, match="not valid JSON"):
        Tokenizer.from_folder(folder)


@pytest.mark.parametrize(
    "file, content, wrong",
    [
        ("tokenizer_config.json", "[1, 2]", "holds a JSON list, not an object"),
        ("tokenizer_config.json", "[" * 100000, "is not valid JSON"),
        ("special_tokens_map.json", '"</s>"', "holds a JSON str, not an object"),
        ("tokenizer_config.json", '{"eos_token": 2}', "eos_token must be a token string, not 2"),
        ("tokenizer_config.json", '{"bos_token": {"id": 1}}', 'bos_token is an object without a text "content"'),
        ("tokenizer_config.json", '{"add_bos_token": "yes"}', "add_bos_token must be true or false"),
        ("tokenizer_config.json", '{"chat_template": 5}', "chat_template must be Jinja text or a list"),
        ("tokenizer_config.json", '{"chat_template": [{"name": "default"}]}', "chat_template must be Jinja text"),
        ("chat_template.jinja", b"\xff\xfe{{ x }}", "cannot be read as UTF-8 text"),
        ("tokenizer.json", '{"model": 1}', "cannot be read"),
    ],
    ids=[
        "config-list",
        "config-deep",
        "map-string",
        "token-number",
        "token-object",
        "flag-string",
        "template-number",
        "template-list",
        "jinja-not-utf8",
        "tokenizer-wrong-type",
    ],
)
def test_bad_tokenizer_files_are_one_line_naming_the_file(tmp_path, file, content, wrong):
    folder = _copy(LLAMA2_TOKENIZER, tmp_path / "t")
    path = folder / file
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ChipspanError) as info:
        Tokenizer.from_folder(folder)
    assert str(path) in str(info.value) and wrong in str(info.value) and "\n" not in str(info.value)


_junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 10)
    | st.text(max_size=6)
    | st.sampled_from(
        [
            "</s>",
            "{{ messages }}",
            "{% for m in messages %}{{ m.content }}",
            "{{ bos_token ~ messages[0].content * 3 }}",
        ]
    ),
    lambda inner: (
        st.lists(inner, max_size=2)
        | st.dictionaries(st.sampled_from(["name", "template", "content"]), inner, max_size=2)
    ),
    max_leaves=4,
)
_FIELDS = [
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "add_bos_token",
    "add_eos_token",
    "chat_template",
    "model_max_length",
]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(_FIELDS), _junk, max_size=3))
def test_any_tokenizer_config_loads_or_is_one_line(tmp_path, changes):
    """Random tokenizer_config.json fields: loading and rendering work or give one ChipspanError line."""
    folder = tmp_path / "t"
    if not folder.is_dir():
        shutil.copytree(LLAMA2_TOKENIZER, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(changes))
    try:
        Tokenizer.from_folder(folder).apply_chat_template(MESSAGES)
    except ChipspanError as exc:
        assert "\n" not in str(exc)
