"""Prompt templates: how a conversation becomes text segments and special tokens, in two revisions.

A template is written the way LLaMA-Factory writes one: lists of *slots*, each a string with
``{{content}}`` (or ``{{idx}}``) placeholders or a special token (``BOS``/``EOS``). Each string slot is
tokenized on its own, so the segment boundaries are part of the format: with a sentencepiece
tokenizer every segment starts with its own leading ``▁``.

Revision ``seed`` reproduces LLaMA-Factory at b988ce0 (llmtuner 0.5.1); revision ``lf-0.9`` reproduces
LLaMA-Factory 0.9.5 and holds the names the seed never had. The two differ in more than strings:
``seed`` puts a separator before every user turn after the first and drops a BOS/EOS slot whose id is
0; ``lf-0.9`` has a prefix before the first message instead and keeps id 0.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import tokenizers

from chipspan.errors import ChipspanError

if TYPE_CHECKING:
    from chipspan.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

REVISIONS = ("seed", "lf-0.9")


@dataclass(frozen=True)
class Special:
    """A slot that stands for one of the tokenizer's own special tokens (``bos_token``/``eos_token``)."""

    name: str


BOS = Special("bos_token")
EOS = Special("eos_token")

Slot = str | Special


@dataclass(frozen=True)
class Template:
    """One chat format. Slot lists are filled with ``content`` and become one message's pieces.

    ``system_in_user``: the system text (formatted by ``system``) is put in front of the first user
    message's content instead of being a segment of its own (the seed's ``llama2``).
    ``stop_words``/``replace_eos``: tokens the tokenizer must know; with ``replace_eos`` the first one
    becomes EOS (see :func:`fix_tokenizer`).
    """

    name: str
    revision: str
    user: tuple[Slot, ...]
    assistant: tuple[Slot, ...] = ("{{content}}", EOS)
    system: tuple[Slot, ...] = ("{{content}}",)
    separator: tuple[Slot, ...] = ()
    prefix: tuple[Slot, ...] = ()
    default_system: str = ""
    system_in_user: bool = False
    stop_words: tuple[str, ...] = ()
    replace_eos: bool = False

    def render(self, messages: list[tuple[str, str]], system: str) -> list[list[Slot]]:
        """Pieces of each message: ``messages`` are ``(role, content)`` pairs, user first, alternating.

        Returns one list per message of strings (to tokenize one by one) and ``Special`` slots.
        An empty ``system`` means the template's default system prompt.
        """
        system = system or self.default_system
        rendered = []
        for i, (role, content) in enumerate(messages):
            pieces: list[Slot] = list(self.prefix) if i == 0 else []
            system_text = ""
            if i == 0 and system:
                if self.system_in_user:
                    system_text = _fill(self.system, content=system)[0]
                else:
                    pieces += _fill(self.system, content=system)
            elif i > 0 and i % 2 == 0:
                pieces += self.separator
            if role == "user" and self.system_in_user:
                pieces += _fill(self.user, content=system_text + content)
            elif role == "user":
                pieces += _fill(self.user, content=content, idx=str(i // 2))
            else:
                pieces += _fill(self.assistant, content=content)
            rendered.append(pieces)
        return rendered

    def special_id(self, slot: Special, tokenizer: Tokenizer) -> int | None:
        """Id of a special slot, or None when it adds nothing.

        The seed tested the id for truth (an id of 0 added nothing); LLaMA-Factory 0.9 tests for None.
        """
        token_id = tokenizer.bos_token_id if slot is BOS else tokenizer.eos_token_id
        if self.revision == "seed":
            return token_id or None
        return token_id


def _fill(slots: tuple[Slot, ...], **values: str) -> list[Slot]:
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


_LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. "
    "Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, "
    "racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, "
    "explain why instead of answering something not correct. "
    "If you don't know the answer to a question, please don't share false information."
)

_TEMPLATES = [
    # LLaMA-Factory b988ce0 / llmtuner 0.5.1
    Template(
        "default",
        "seed",
        user=("Human: {{content}}\nAssistant: ",),
        separator=("\n",),
    ),
    Template(
        "llama2",
        "seed",
        user=(BOS, "[INST] {{content}} [/INST]"),
        system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
        default_system=_LLAMA2_SYSTEM,
        system_in_user=True,
    ),
    # LLaMA-Factory 0.9.5
    Template(
        "chatml",
        "lf-0.9",
        user=("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
        assistant=("{{content}}<|im_end|>\n",),
        system=("<|im_start|>system\n{{content}}<|im_end|>\n",),
        stop_words=("<|im_end|>", "<|im_start|>"),
        replace_eos=True,
    ),
    Template("empty", "lf-0.9", user=("{{content}}",), assistant=("{{content}}",)),
]
TEMPLATES: dict[str, dict[str, Template]] = {rev: {} for rev in REVISIONS}
for _t in _TEMPLATES:
    TEMPLATES[_t.revision][_t.name] = _t


def get_template(name: str, revision: str = "seed") -> Template:
    """The template ``name`` in ``revision``; a name only ``lf-0.9`` has is used whatever the revision."""
    if revision not in TEMPLATES:
        raise ChipspanError(f"unknown template revision '{revision}': use one of {', '.join(REVISIONS)}")
    if name in TEMPLATES[revision]:
        return TEMPLATES[revision][name]
    if name in TEMPLATES["lf-0.9"] and name not in TEMPLATES["seed"]:
        return TEMPLATES["lf-0.9"][name]
    if name in TEMPLATES["seed"]:
        raise ChipspanError(
            f"template '{name}' has no revision '{revision}' yet: use --template_revision seed"
        )
    known = sorted({n for table in TEMPLATES.values() for n in table})
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ChipspanError(f"unknown template '{name}'{hint}: known templates are {', '.join(known)}")


def fix_tokenizer(tokenizer: Tokenizer, template: Template | None) -> list[str]:
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
        tokenizer.backend.add_special_tokens(
            [tokenizers.AddedToken(t, special=True, normalized=False) for t in added]
        )
        log.warning(
            "added %s to the tokenizer for template '%s': the model's embeddings must grow to %d rows",
            ", ".join(added), template.name if template else "-", len(tokenizer),
        )
    if eos and tokenizer.eos_token != eos:
        tokenizer.special_tokens["eos"] = eos
    return added

