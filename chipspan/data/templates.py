"""Prompt templates: how a conversation becomes text segments and special tokens, in two revisions.

A template is written the way LLaMA-Factory writes one: lists of *slots*, each a string with
``{{content}}`` (or ``{{idx}}``) placeholders, a special token (``BOS``/``EOS``) or a named vocabulary
token (``Token("<|user|>")``). Each string slot is tokenized on its own, so the segment boundaries are
part of the format: with a sentencepiece tokenizer every segment starts with its own leading ``▁``.

Revision ``lf-0.5`` reproduces LLaMA-Factory at b988ce0 (llmtuner 0.5.1); revision ``lf-0.9`` reproduces
LLaMA-Factory 0.9.5 and holds the names LLaMA-Factory 0.5 never had. The two differ in more than strings:
``lf-0.5`` puts a separator before every user turn after the first, may force a system segment, and drops
a BOS/EOS slot whose id is 0; ``lf-0.9`` has a prefix before the first message instead, keeps id 0,
formats tool calls per model family and may add an empty thought to answers (``thinking``).
The tables are in ``template_lf05.py`` and ``template_lf09.py``; ``--template auto`` is in
``template_auto.py``.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import tokenizers

from chipspan.data import template_tools
from chipspan.errors import ChipspanError

if TYPE_CHECKING:
    from chipspan.args import DataArguments
    from chipspan.data.template_auto import ChatTemplate
    from chipspan.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ROLES = ("user", "assistant", "function", "observation")


@dataclass(frozen=True)
class Special:
    """A slot that stands for one of the tokenizer's own special tokens (``bos_token``/``eos_token``)."""

    name: str


@dataclass(frozen=True)
class Token:
    """A slot that is one vocabulary token named by its text, never split (e.g. ``<reserved_102>``)."""

    text: str


BOS = Special("bos_token")
EOS = Special("eos_token")

Slot = str | Special | Token
Slots = tuple[Slot, ...]

# LLaMA-Factory 0.9's markers around a reasoning model's thought and around a tool call.
THOUGHT = ("<think>\n", "\n</think>\n\n")
TOOL_CALL = ("<tool_call>", "</tool_call>")
_THOUGHT_RE = re.compile(re.escape(THOUGHT[0]) + "(.*?)" + re.escape(THOUGHT[1]), re.DOTALL)
_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL[0]) + "(.*?)" + re.escape(TOOL_CALL[1]), re.DOTALL)


@dataclass(frozen=True)
class Template:
    """One chat format. Slot lists are filled with ``content`` and become one message's pieces.

    ``system_in_user``: the system text (formatted by ``system``) is put in front of the first user
    message's content instead of being a segment of its own (LLaMA-Factory's ``Llama2Template``).
    ``force_system`` (seed): the system segment is there even when the system text is empty.
    ``efficient_eos``: the assistant slot has no EOS; one EOS ends the whole sequence instead, and
    (unless the prompt is trained) each later prompt's first label is EOS.
    ``stop_words``/``replace_eos``: tokens the tokenizer must know; with ``replace_eos`` the first one
    becomes EOS (see :func:`fix_tokenizer`). ``tool_format`` names how tools and function calls are
    written (:mod:`template_tools`). ``thinking`` (lf-0.9 reasoning templates): an answer without a
    thought gets an empty one in front, trained (LLaMA-Factory's default ``enable_thinking=True``).
    """

    name: str
    revision: str
    user: Slots
    assistant: Slots
    system: Slots
    function: Slots
    observation: Slots
    separator: Slots = ()
    prefix: Slots = ()
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    efficient_eos: bool = False
    replace_eos: bool = False
    force_system: bool = False
    system_in_user: bool = False
    tool_format: str = "default"
    thinking: bool = False

    def render(
        self, messages: list[tuple[str, str]], system: str, tools: str = "", mask_history: bool = False
    ) -> list[list[Slot]]:
        """Pieces of each message: ``messages`` are ``(role, content)`` pairs alternating between the
        user side (user, observation) and the assistant side (assistant, function), user side first.

        Returns one list per message of strings (to tokenize one by one) and special/token slots.
        An empty ``system`` means the template's default system prompt; ``tools`` is JSON text.
        ``mask_history`` (lf-0.9): history thoughts are dropped, as LLaMA-Factory does then.
        """
        system = system or self.default_system
        lf05 = self.revision == "lf-0.5"
        empty_thought: set[int] = set()
        if self.thinking:
            messages, empty_thought = self._with_thoughts(messages, mask_history)
        rendered = []
        for i, (role, content) in enumerate(messages):
            pieces: list[Slot] = []
            system_text = ""
            if i == 0:
                pieces += self.prefix
                if system or tools or (lf05 and self.force_system):
                    tool_text = template_tools.tools_text(self.tool_format, tools) if tools else ""
                    filled = _fill(self.system, content=system + tool_text)
                    if self.system_in_user:
                        system_text = filled[0]
                    else:
                        pieces += filled
            elif lf05 and i % 2 == 0:
                pieces += self.separator
            if i in empty_thought:
                pieces.append(THOUGHT[0] + THOUGHT[1])
            pieces += self._message(role, content, i, system_text)
            rendered.append(pieces)
        return rendered

    def _message(self, role: str, content: str, index: int, system_text: str) -> list[Slot]:
        if role == "user" and self.system_in_user:
            return _fill(self.user, content=system_text + content)
        if role == "user":
            return _fill(self.user, content=content, idx=str(index // 2))
        if role == "assistant":
            return _fill(self.assistant, content=content)
        if role == "observation":
            return _fill(self.observation, content=content)
        if role != "function":
            raise ChipspanError(f"message role '{role}' is not one of {', '.join(ROLES)}")
        if self.revision == "lf-0.5":
            name, arguments = template_tools.lf05_call(content)
            return [
                s.replace("{{name}}", name).replace("{{arguments}}", arguments) if isinstance(s, str) else s
                for s in self.function
            ]
        return _fill(self.function, content=self._call_text(content))

    def _call_text(self, content: str) -> str:
        """An lf-0.9 function message as text: a thought or text around a ``<tool_call>`` is kept.
        Templates with ``system_in_user`` read the whole message as the calls' JSON (as 0.9's Llama2Template)."""
        call = None if self.system_in_user else _TOOL_CALL_RE.search(content)
        if call is not None:
            return content.replace(call.group(0), "") + template_tools.calls_text(self.tool_format, call.group(1))
        thought = None if self.system_in_user else _THOUGHT_RE.search(content)
        if thought is None:
            return template_tools.calls_text(self.tool_format, content)
        calls = template_tools.calls_text(self.tool_format, content.replace(thought.group(0), ""))
        return thought.group(0) + calls

    def _with_thoughts(
        self, messages: list[tuple[str, str]], mask_history: bool
    ) -> tuple[list[tuple[str, str]], set[int]]:
        """The messages, and the answers (assistant-side messages) that get an empty thought: those
        without one. With ``mask_history`` earlier answers lose their thoughts and only the last
        answer may get an empty one."""
        out = list(messages)
        answers = range(1, len(out), 2)
        if mask_history:
            for i in answers[:-1]:
                out[i] = (out[i][0], _THOUGHT_RE.sub("", out[i][1]).lstrip("\n"))
            answers = answers[-1:]
        bare = {i for i in answers if THOUGHT[0].strip() not in out[i][1] and THOUGHT[1].strip() not in out[i][1]}
        return out, bare

    def special_id(self, slot: Special | Token, tokenizer: Tokenizer) -> int | None:
        """Id of a special or token slot, or None when it adds nothing.

        LLaMA-Factory 0.5 tested BOS/EOS ids for truth (an id of 0 added nothing); LLaMA-Factory 0.9 tests for None.
        """
        if isinstance(slot, Token):
            token_id = tokenizer.token_to_id(slot.text)
            if token_id is None:
                raise ChipspanError(
                    f"template '{self.name}' needs the token {slot.text}, which this tokenizer lacks: "
                    "use the model family's own tokenizer or another template"
                )
            return token_id
        token_id = tokenizer.bos_token_id if slot is BOS else tokenizer.eos_token_id
        if self.revision == "lf-0.5":
            return token_id or None
        return token_id


def _fill(slots: Slots, **values: str) -> list[Slot]:
    """Put ``values`` into the placeholders: each name replaces its first ``{{name}}``, in order.

    The order matters and is LLaMA-Factory's: a user text holding ``{{idx}}`` gets the turn index.
    """
    filled = []
    for slot in slots:
        if isinstance(slot, str):
            for name, value in values.items():
                slot = slot.replace("{{" + name + "}}", value, 1)
        filled.append(slot)
    return filled


def define(revision: str, name: str, user: Slots = ("{{content}}",), **fields) -> Template:
    """A template with each revision's defaults for the slots ``fields`` leaves out.

    Both revisions: the assistant slot is content + EOS (no EOS with ``efficient_eos``), the system slot
    is ``{{content}}``, an observation is written like a user message. A function call is written
    ``Action: name\\nAction Input: arguments`` + EOS in LLaMA-Factory 0.5; in lf-0.9 like an assistant message.
    """
    eos = () if fields.get("efficient_eos") else (EOS,)
    fields.setdefault("assistant", ("{{content}}", *eos))
    fields.setdefault("system", ("{{content}}",))
    fields.setdefault("observation", user)
    if revision == "lf-0.5":
        fields.setdefault("function", ("Action: {{name}}\nAction Input: {{arguments}}", *eos))
        fields.setdefault("tool_format", "lf-0.5")
    else:
        fields.setdefault("function", fields["assistant"])
    return Template(name, revision, user=user, **fields)


def with_options(template: Template, default_system: str | None = None, tool_format: str | None = None) -> Template:
    """``template`` with ``--default_system`` and ``--tool_format`` applied, as LLaMA-Factory 0.9 does:
    a tool format also resets the function slot to content + EOS (content alone with efficient_eos)."""
    if default_system is not None:
        template = replace(template, default_system=default_system)
    if tool_format is not None:
        if template.revision == "lf-0.5":
            raise ChipspanError("--tool_format needs --template_revision lf-0.9: LLaMA-Factory 0.5 had one tool format")
        function = ("{{content}}",) if template.efficient_eos else ("{{content}}", EOS)
        template = replace(template, tool_format=tool_format, function=function)
    return template


def _tables() -> dict[str, dict[str, Template]]:
    from chipspan.data.template_lf05 import LF05_TEMPLATES
    from chipspan.data.template_lf09 import LF09_TEMPLATES

    return {"lf-0.5": {t.name: t for t in LF05_TEMPLATES}, "lf-0.9": {t.name: t for t in LF09_TEMPLATES}}


TEMPLATES: dict[str, dict[str, Template]] = _tables()


def run_template(data: DataArguments, tokenizer: Tokenizer | None = None) -> Template | ChatTemplate:
    """The template a run's --template, --template_revision, --default_system and --tool_format name,
    as training, chat and export all read it."""
    return get_template(
        data.template,
        data.template_revision,
        tokenizer=tokenizer,
        default_system=data.default_system,
        tool_format=data.tool_format,
    )


def get_template(
    name: str,
    revision: str = "lf-0.5",
    *,
    tokenizer: Tokenizer | None = None,
    default_system: str | None = None,
    tool_format: str | None = None,
) -> Template | ChatTemplate:
    """The template ``name`` in ``revision``; a name only ``lf-0.9`` has is used whatever the revision.

    ``auto`` is the tokenizer's own chat template (needs ``tokenizer``). ``default_system`` and
    ``tool_format`` are the ``--default_system``/``--tool_format`` flags (None: the template's own).
    """
    if name == "auto":
        from chipspan.data.template_auto import auto_template

        if tool_format is not None:
            raise ChipspanError("--tool_format does not apply to --template auto: the chat template writes tools")
        return auto_template(tokenizer, default_system=default_system)
    if name in TEMPLATES[revision]:
        return with_options(TEMPLATES[revision][name], default_system, tool_format)
    if name in TEMPLATES["lf-0.9"] and name not in TEMPLATES["lf-0.5"]:
        return with_options(TEMPLATES["lf-0.9"][name], default_system, tool_format)
    if name in TEMPLATES["lf-0.5"]:
        raise ChipspanError(
            f"template '{name}' is not in LLaMA-Factory 0.9 (revision '{revision}'): use --template_revision lf-0.5"
        )
    known = sorted({n for table in TEMPLATES.values() for n in table} | {"auto"})
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ChipspanError(f"unknown template '{name}'{hint}: known templates are {', '.join(known)}")


def revision_notice(name: str, revision: str) -> str | None:
    """A line naming which LLaMA-Factory's version of template ``name`` encodes the run, when the two
    revisions both have the name and their versions differ (None otherwise)."""
    lf05, lf09 = TEMPLATES["lf-0.5"].get(name), TEMPLATES["lf-0.9"].get(name)
    if lf05 is None or lf09 is None or replace(lf05, revision="lf-0.9") == lf09:
        return None
    used, other = ("LLaMA-Factory 0.5", "lf-0.9") if revision == "lf-0.5" else ("LLaMA-Factory 0.9.5", "lf-0.5")
    return f"template {name}: {used}'s (template_revision {revision}); the other differs: --template_revision {other}"


def fix_tokenizer(tokenizer: Tokenizer, template: Template | ChatTemplate | None) -> list[str]:
    """Give the tokenizer what the template needs, as LLaMA-Factory did; returns the tokens added.

    With ``replace_eos`` the template's first stop word becomes EOS; the other stop words become
    special tokens; a tokenizer with no EOS gets ``<|endoftext|>``. Pad needs no fixing: a tokenizer
    without a pad token pads with EOS. Added tokens grow the vocabulary, so the model's embeddings
    must grow with it.
    """
    stop_words = list(template.stop_words) if template else []
    eos = stop_words.pop(0) if template and template.replace_eos else None
    if eos is None and tokenizer.eos_token_id is None:
        eos = "<|endoftext|>"
    added = [t for t in ([eos] if eos else []) + stop_words if tokenizer.token_to_id(t) is None]
    if added:
        tokenizer.backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in added])
        log.warning(
            "added %s to the tokenizer for template '%s': the model's embeddings must grow to %d rows",
            ", ".join(added),
            template.name if template else "-",
            len(tokenizer),
        )
    if eos and tokenizer.eos_token != eos:
        tokenizer.special_tokens["eos"] = eos
    return added
