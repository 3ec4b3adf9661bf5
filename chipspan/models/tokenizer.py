"""The tokenizer: a Hugging Face ``tokenizer.json`` run by the ``tokenizers`` library, plus chat templates.

Reads and writes the files ``transformers`` uses (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, ``chat_template.jinja``), so ids match ``AutoTokenizer`` and what we save
loads there. Chat templates are Jinja run in a bounded sandbox (``chat_sandbox``): a template from the
Hub is untrusted code. The files are untrusted too: a field of the wrong type is one error naming the file.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from tokenizers import processors

from chipspan.errors import ChipspanError
from chipspan.models.chat_sandbox import BoundedEnvironment, TemplateRefused, render

SPECIAL_NAMES = ("bos", "eos", "unk", "pad")


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template.

    ``special_tokens`` maps ``"bos"``/``"eos"``/``"unk"``/``"pad"`` to token strings (absent = none).
    ``add_bos_token``/``add_eos_token``, when given, decide what ``add_special_tokens=True`` adds
    (as in transformers' Llama tokenizers); when ``None`` the post-processor in ``tokenizer.json`` does.
    ``chat_template`` is a Jinja string, or a dict of named templates with a ``"default"`` one;
    ``chat_template_files`` names the file each template came from (for messages).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | dict[str, str] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        model_max_length: int | None = None,
    ):
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if k in SPECIAL_NAMES and v}
        self.chat_template = chat_template
        self.chat_template_files: dict[str, Path] = {}
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.model_max_length = model_max_length
        # Like transformers: named special tokens become special added tokens (skipped by decode),
        # and ones missing from the vocabulary are appended to it.
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [
            tokenizers.AddedToken(t, special=True, normalized=False)
            for t in self.special_tokens.values()
            if t not in known
        ]
        if missing:
            backend.add_special_tokens(missing)
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))

    # ---- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` and the optional config files from a model or tokenizer folder."""
        folder = Path(path)
        if not folder.is_dir():
            raise ChipspanError(f"tokenizer folder {folder} does not exist: pass one holding tokenizer.json")
        if not (folder / "tokenizer.json").is_file():
            hint = (
                "it has only tokenizer.model (sentencepiece), which chipspan does not read; "
                if (folder / "tokenizer.model").is_file()
                else ""
            )
            convert = f"AutoTokenizer.from_pretrained('{folder}').save_pretrained('{folder}')"
            raise ChipspanError(
                f'no tokenizer.json in {folder}: {hint}make one with `python -c "from transformers import '
                f'AutoTokenizer; {convert}"` (needs transformers and sentencepiece)'
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:
            raise ChipspanError(
                f"{folder / 'tokenizer.json'} cannot be read ({_one_line(exc)}): re-download or re-save it"
            ) from exc

        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file)
        token_map = _read_json(folder / "special_tokens_map.json")
        special = {}
        for name in SPECIAL_NAMES:  # tokenizer_config.json wins; special_tokens_map.json fills gaps
            key = f"{name}_token"
            special[name] = _token(config_file, key, config.get(key)) or _token(
                folder / "special_tokens_map.json", key, token_map.get(key)
            )
        flags = {key: _flag(config_file, key, config.get(key)) for key in ("add_bos_token", "add_eos_token")}

        template, files = _config_templates(config_file, config.get("chat_template"))
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():  # the file wins, as in recent transformers
            try:
                text = jinja_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ChipspanError(
                    f"{jinja_file} cannot be read as UTF-8 text ({_one_line(exc)}): re-save it or remove it"
                ) from exc
            template = {**template, "default": text} if isinstance(template, dict) else text
            files["default"] = jinja_file

        max_len = config.get("model_max_length")
        tokenizer = cls(
            backend,
            special,
            chat_template=template,
            model_max_length=max_len if isinstance(max_len, int) and max_len < 10**12 else None,
            **flags,
        )
        tokenizer.chat_template_files = files
        return tokenizer

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for transformers.

        With no pad token of its own, EOS is written as the pad token, as LLaMA-Factory does.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        named = {f"{name}_token": self.special_tokens.get(name) for name in SPECIAL_NAMES}
        named["pad_token"] = self.pad_token
        named = {k: v for k, v in named.items() if v is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **named}
        for key in ("add_bos_token", "add_eos_token", "model_max_length"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        if isinstance(self.chat_template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        elif self.chat_template is not None:
            config["chat_template"] = self.chat_template
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", named)):
            text = json.dumps(content, indent=2, ensure_ascii=False)
            (folder / name).write_text(text + "\n", encoding="utf-8")

    # ---- encoding and decoding ----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in the text become their ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of many texts at once (in parallel, in Rust; no character offsets computed)."""
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(tokenizer)`` in transformers)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- special tokens -----------------------------------------------------------------------

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos")

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens.get("unk")

    @property
    def pad_token(self) -> str | None:
        """The pad token; EOS when the tokenizer has none (see ``pad_is_eos``)."""
        return self.special_tokens.get("pad") or self.eos_token

    @property
    def pad_is_eos(self) -> bool:
        """True when padding uses EOS's id (no pad token of its own), so a pad id cannot mark padding."""
        return self.pad_token_id is not None and self.pad_token_id == self.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every special added token (named ones and the rest, such as ``<|eot_id|>``)."""
        return sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos = self.bos_token if add_bos else None
        eos = self.eos_token if add_eos else None

        def sequence(name: str, type_id: int) -> list[str]:
            return [f"{t}:{type_id}" for t in (bos, f"${name}", eos) if t]

        self.backend.post_processor = processors.TemplateProcessing(
            single=sequence("A", 0),
            pair=sequence("A", 0) + sequence("B", 1),
            special_tokens=[(t, self.backend.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t],
        )

    # ---- chat templates -----------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        **extra,
    ) -> str:
        """Render ``messages`` (``{"role": ..., "content": ...}`` dicts) with the chat template.

        ``tools`` are JSON schemas; ``extra`` become template variables (e.g. ``date_string``).
        The special tokens (``bos_token``, ``eos_token``, ...) are variables too, as in transformers.
        """
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise ChipspanError("chat tools must be JSON-schema dicts like {'type': 'function', ...}")
        name, source = self._template_source(tools)
        where = self._template_place(name)
        variables = {f"{special}_token": token for special, token in self.special_tokens.items()}
        variables.update(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **extra)
        try:
            return render(_compile(source), variables)
        except TemplateRefused as exc:
            raise ChipspanError(
                f"{where} was stopped: {exc}; chipspan bounds what an untrusted template may do, "
                "so use a template you trust (or a named --template)"
            ) from exc
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChipspanError(
                f"{where} does not parse: {_one_line(exc)} (line {exc.lineno}); fix the template"
            ) from exc
        except jinja2.exceptions.SecurityError as exc:
            raise ChipspanError(
                f"{where} was stopped doing something unsafe ({_one_line(exc)}): use a template you trust"
            ) from exc
        except jinja2.exceptions.TemplateError as exc:
            raise ChipspanError(f"{where} rejected the conversation: {_one_line(exc)}") from exc
        except Exception as exc:  # the template is untrusted code: whatever it raises is its failure
            raise ChipspanError(
                f"{where} failed ({type(exc).__name__}: {_one_line(exc)[:200]}): fix the "
                "template or use a named --template"
            ) from exc

    def _template_place(self, name: str) -> str:
        """``chat template in FILE`` (or ``chat template 'NAME'`` when it was not read from a file)."""
        file = self.chat_template_files.get(name)
        return f"chat template in {file}" if file else f"chat template '{name}'"

    def _template_source(self, tools: list[dict] | None) -> tuple[str, str]:
        """The name (``default``, ``tool_use``, ...) and text of the template to render."""
        template, name = self.chat_template, "default"
        if isinstance(template, dict):
            name = "tool_use" if tools is not None and "tool_use" in template else "default"
            if name not in template:
                raise ChipspanError(
                    f"tokenizer has chat templates {sorted(template)} but none named 'default': "
                    "add one to tokenizer_config.json"
                )
            template = template[name]
        if template is None:
            raise ChipspanError(
                "this tokenizer has no chat template: add chat_template to its tokenizer_config.json "
                "or a chat_template.jinja file"
            )
        if not isinstance(template, str):
            raise ChipspanError(f"{self._template_place(name)} is {type(template).__name__}, not Jinja text")
        return name, template


# ---- the Jinja sandbox ------------------------------------------------------------------------


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text in some templates): the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """``tojson`` as chat templates expect it: plain JSON, no HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 256:
        raise TemplateRefused("it passes strftime_now a format that is not a short text")
    return datetime.now().strftime(fmt)


@functools.cache
def _environment() -> BoundedEnvironment:
    env = BoundedEnvironment(
        filters={"tojson": _tojson},
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _Generation],
    )
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    return _environment().compile_template(source)


def _read_json(path: Path) -> dict:
    """The JSON object in ``path`` ({} when there is no such file)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ChipspanError(f"{path} is not valid JSON ({_one_line(exc)[:200]}): fix or remove it") from exc
    if not isinstance(data, dict):
        raise ChipspanError(f"{path} holds a JSON {type(data).__name__}, not an object of settings: fix or remove it")
    return data


def _token(file: Path, key: str, value: object) -> str | None:
    """A special token from a config file: a string, ``{"content": string}`` (an AddedToken) or null."""
    if isinstance(value, dict):
        value = value.get("content")
        if not isinstance(value, str):
            raise ChipspanError(f'{file}: {key} is an object without a text "content": fix the file')
    if value is not None and not isinstance(value, str):
        raise ChipspanError(f"{file}: {key} must be a token string, not {json.dumps(value)[:60]}: fix the file")
    return value


def _flag(file: Path, key: str, value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ChipspanError(f"{file}: {key} must be true or false, not {json.dumps(value)[:60]}: fix the file")
    return value


def _config_templates(file: Path, value: object) -> tuple[str | dict[str, str] | None, dict[str, Path]]:
    """``chat_template`` of tokenizer_config.json (a string, a list of ``{"name", "template"}`` or null) and
    the file each named template came from."""
    if value is None:
        return None, {}
    if isinstance(value, str):
        return value, {"default": file}
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    ):
        templates = {t["name"]: t["template"] for t in value}
        return templates, dict.fromkeys(templates, file)
    raise ChipspanError(
        f'{file}: chat_template must be Jinja text or a list of {{"name": ..., "template": '
        f"...}} objects, not {json.dumps(value)[:60]}: fix the file"
    )


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
