"""A training template as a Jinja chat template, so transformers, vLLM and llama.cpp format prompts
as training did.

chipspan tokenizes each string slot of a template on its own; a chat template renders one text that
is tokenized whole. The two agree when no token spans a slot boundary, which is the case for most
tokenizers, but a sentencepiece-style tokenizer puts a word-start marker (``▁``) at the start of
every piece it is given alone: there, a space at each boundary between two text slots reproduces it.
:func:`chat_template_for` writes both forms, checks each against training's ids on a set of probe
conversations, and returns the one that agrees (or the first, with what still differs).

What the Jinja handles: an optional leading system message (else the template's default system),
user, assistant and tool (observation) messages. Tools and function calls raise an error in the
template: the training templates write them in formats chat endpoints do not share.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from chipspan.data.encode import encode_prompt, encode_supervised
from chipspan.data.formats import Conversation
from chipspan.data.templates import THOUGHT, Special, Template, Token
from chipspan.models.tokenizer import Tokenizer

# Conversations the chat template is checked on: with and without a system prompt, one and two
# turns, a message that starts with a space, digits, Chinese and an emoji.
PROBES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("", (("user", "Hi there"), ("assistant", "Hello! How can I help?"))),
    ("You are a terse assistant.", (("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", "6"))),
    ("", (("user", " leading space"), ("assistant", "Sure."), ("user", "你好"), ("assistant", "你好！😀"))),
    ("系统", (("user", "1"), ("assistant", "2"))),
)
FIRST_PROMPT = "the prompt before answer 1"

CONTENT = "message['content']"  # the Jinja expression of a message's text


@dataclass(frozen=True)
class WrittenTemplate:
    """A chat template's Jinja ``source`` and the checks where its ids differ from training's
    (``differences``, one line each; empty when it agrees on all of them)."""

    source: str
    differences: tuple[str, ...]

    @property
    def first_prompts_agree(self) -> bool:
        """Whether a first turn's prompt always has training's ids (what differs is in the history)."""
        return not any(line.startswith(FIRST_PROMPT) for line in self.differences)


def chat_template_for(template: Template, tokenizer: Tokenizer) -> WrittenTemplate:
    """The Jinja chat template of ``template`` for ``tokenizer`` (the tokenizer as exported, after
    ``fix_tokenizer``), checked against training's encoding: of the two forms, the one whose first
    prompts agree, then the one with fewer differences (unspaced on a tie)."""
    written = []
    for spaced in (False, True):
        source = jinja_source(template, tokenizer, spaced)
        written.append(WrittenTemplate(source, tuple(check_against_training(source, template, tokenizer))))
    return min(written, key=lambda w: (not w.first_prompts_agree, len(w.differences)))


def jinja_source(template: Template, tokenizer: Tokenizer, spaced: bool = False) -> str:
    """The Jinja text: ``spaced`` puts a space between consecutive text slots (see the module doc)."""
    writer = _Writer(template, tokenizer, spaced)
    return writer.source()


def check_against_training(source: str, template: Template, tokenizer: Tokenizer) -> list[str]:
    """One line per probe whose chat-template ids differ from training's, for the whole conversation
    and for the prompt before each answer."""
    probe_tokenizer = copy.copy(tokenizer)
    probe_tokenizer.chat_template, probe_tokenizer.chat_template_files = source, {}
    problems = []
    for number, (system, messages) in enumerate(PROBES, 1):
        chat = ([{"role": "system", "content": system}] if system else []) + [
            {"role": role, "content": content} for role, content in messages
        ]
        for k in range(1, len(messages), 2):
            want = encode_prompt(list(messages[:k]), template, tokenizer, system)
            got = _ids(probe_tokenizer, chat[: len(chat) - len(messages) + k], True)
            if got != want:
                what = f"the prompt before answer {k // 2 + 1} of probe {number}"
                problems.append(_difference(what, got, want, tokenizer))
        conversation = Conversation(prompt=messages[:-1], response=(messages[-1][1],), system=system)
        want = encode_supervised([conversation], template, tokenizer, cutoff_len=2**31)[0].input_ids
        got = _ids(probe_tokenizer, chat, False)
        if got != want:
            problems.append(_difference(f"the whole of probe {number}", got, want, tokenizer))
    return problems


def _ids(tokenizer: Tokenizer, chat: list[dict], generation_prompt: bool) -> list[int]:
    """What transformers' ``apply_chat_template(..., tokenize=True)`` gives: the text, no special tokens added."""
    return tokenizer.encode(tokenizer.apply_chat_template(chat, add_generation_prompt=generation_prompt))


def _difference(what: str, got: list[int], want: list[int], tokenizer: Tokenizer) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (
        f"{what}: token {at} is {tokenizer.id_to_token(got[at]) if at < len(got) else 'missing'!r} "
        f"in the chat template's ids, {tokenizer.id_to_token(want[at]) if at < len(want) else 'missing'!r} "
        "in training's"
    )


class _Writer:
    """Builds the Jinja text of one template, slot by slot."""

    def __init__(self, template: Template, tokenizer: Tokenizer, spaced: bool):
        self.template, self.tokenizer, self.spaced = template, tokenizer, spaced
        self.lf05 = template.revision == "lf-0.5"

    def source(self) -> str:
        t = self.template
        first = self._pieces(t.prefix)
        system_test = "true" if self.lf05 and t.force_system else "system"
        if not t.system_in_user:
            first += f"{{%- if {system_test} -%}}{self._slots(t.system, content='system')}{{%- endif -%}}"
        later = self._pieces(t.separator) if self.lf05 else ""
        user_content = CONTENT
        if t.system_in_user:
            system_text = self._text(str(t.system[0]), content="system")
            user_content = f"(({system_text}) if loop.first and {system_test} else '') + {CONTENT}"
        thought = ""
        if t.thinking:
            thought = (
                f"{{%- if '{THOUGHT[0].strip()}' not in message['content'] and '{THOUGHT[1].strip()}' not in "
                f"message['content'] -%}}{self._emit_text(_literal(THOUGHT[0] + THOUGHT[1]))}{{%- endif -%}}"
            )
        end = "{%- if messages and messages[-1]['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
        return (
            ("{%- set ns = namespace(text=false) -%}" if self.spaced else "")
            + "{%- if tools -%}{{ raise_exception('this chat template has no tool format: "
            "chipspan trains tool calls in formats chat endpoints do not share') }}{%- endif -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
            "{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
            f"{{%- if not system -%}}{{%- set system = {_literal(t.default_system)} -%}}{{%- endif -%}}"
            "{%- for message in loop_messages -%}"
            f"{{%- if loop.first -%}}{first}"
            + (f"{{%- elif loop.index0 % 2 == 0 -%}}{later}" if later else "")
            + "{%- endif -%}"
            f"{{%- if message['role'] == 'user' -%}}"
            f"{self._slots(t.user, content=user_content, idx='(loop.index0 // 2) | string')}"
            f"{{%- elif message['role'] == 'assistant' -%}}{thought}{self._slots(t.assistant, content=CONTENT)}"
            f"{{%- elif message['role'] in ('tool', 'observation') -%}}"
            f"{self._slots(t.observation, content=CONTENT)}"
            "{%- else -%}{{ raise_exception('message role ' + message['role'] + ' is not one of system, user, "
            "assistant, tool') }}{%- endif -%}"
            "{%- endfor -%}" + (end if t.efficient_eos else "")
        )

    def _slots(self, slots, **values: str) -> str:
        """The Jinja of one message's slots, its placeholders filled by the Jinja expressions ``values``."""
        return "".join(
            self._emit_text(self._text(slot, **values)) if isinstance(slot, str) else self._pieces((slot,))
            for slot in slots
        )

    def _emit_text(self, expression: str) -> str:
        """Output a text slot; spaced, after a space when the slot before it was text too."""
        if not self.spaced:
            return f"{{{{ {expression} }}}}"
        return f"{{%- if ns.text -%}}{{{{ ' ' }}}}{{%- endif -%}}{{{{ {expression} }}}}{{%- set ns.text = true -%}}"

    def _emit_token(self, expression: str) -> str:
        """Output a special token (its text); spaced, the next text slot then gets no space."""
        return f"{{{{ {expression} }}}}" + ("{%- set ns.text = false -%}" if self.spaced else "")

    def _text(self, slot: str, **values: str) -> str:
        """A Jinja expression for a string slot: literals and the placeholders' expressions joined by ``+``."""
        parts, rest = [], slot
        while True:
            found = [(rest.find("{{" + name + "}}"), name) for name in values if "{{" + name + "}}" in rest]
            if not found:
                break
            at, name = min(found)
            parts += [_literal(rest[:at]), f"({values[name]})"]
            rest = rest[at + len(name) + 4 :]
        parts.append(_literal(rest))
        return " + ".join(p for p in parts if p != "''") or "''"

    def _pieces(self, slots) -> str:
        """Jinja for slots without placeholders: literal text, a token's text, BOS/EOS when they add an id."""
        out = []
        for slot in slots:
            if isinstance(slot, Token):
                out.append(self._emit_token(_literal(slot.text)))
            elif isinstance(slot, Special):
                if self.template.special_id(slot, self.tokenizer) is not None:
                    out.append(self._emit_token(slot.name))
            elif slot:
                out.append(self._emit_text(_literal(slot)))
        return "".join(out)


def _literal(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return "'" + escaped.replace("\t", "\\t") + "'"
