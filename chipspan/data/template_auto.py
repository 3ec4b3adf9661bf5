"""``--template auto``: the model's own chat template (the Jinja one in its tokenizer) decides the text.

Which text is trained comes from rendering prefixes of the conversation: before each answer the
template renders everything up to and including the generation prompt (``messages[:k]`` with
``add_generation_prompt=True``), and the answer with its end-of-turn marker is what
``messages[:k + 1]`` adds after that. Those texts must be prefixes of the whole conversation's
text; a template that rewrites earlier turns (e.g. one that drops old thoughts) cannot be split
this way and is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chipspan.errors import ChipspanError

if TYPE_CHECKING:
    from chipspan.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's chat template in the role of a :class:`templates.Template`.

    ``default_system`` (the ``--default_system`` flag) is used when a row has no system prompt; empty:
    the chat template's own choice. It needs no tokens added, so ``stop_words`` is empty.
    """

    tokenizer: Tokenizer
    default_system: str = ""
    name: str = "auto"
    revision: str = "auto"
    stop_words: tuple[str, ...] = ()
    replace_eos: bool = False
    efficient_eos: bool = False

    def render_spans(
        self, messages: list[tuple[str, str]], system: str, tools: str = ""
    ) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and the ``(start, end)`` character span of each answer in it.

        ``messages`` are ``(role, content)`` pairs as in :meth:`templates.Template.render`; ``tools``
        is the row's JSON text of tool schemas ("" for none).
        """
        chat = _chat_messages(messages, system or self.default_system)
        offset = len(chat) - len(messages)  # 1 with a system message
        tool_list = _tool_list(tools)
        text = self._render(chat, False, tool_list)
        spans = []
        for k in range(offset + 1, len(chat), 2):
            prompt = self._render(chat[:k], True, tool_list)
            through_answer = self._render(chat[: k + 1], False, tool_list)
            if not (through_answer.startswith(prompt) and text.startswith(through_answer)):
                raise ChipspanError(
                    "the tokenizer's chat template renders earlier turns differently as the conversation "
                    "grows, so answers cannot be told from prompts: pass a named --template instead of auto"
                )
            spans.append((len(prompt), len(through_answer)))
        return text, spans

    def _render(self, chat: list[dict], generation_prompt: bool, tools: list[dict] | None) -> str:
        return self.tokenizer.apply_chat_template(chat, add_generation_prompt=generation_prompt, tools=tools)


def auto_template(tokenizer: Tokenizer | None, default_system: str | None = None) -> ChatTemplate:
    """The ``auto`` template of ``tokenizer``; refuses a tokenizer without a chat template."""
    if tokenizer is None:
        raise ChipspanError("--template auto needs the model's tokenizer to read its chat template")
    if tokenizer.chat_template is None:
        raise ChipspanError(
            "--template auto: this tokenizer has no chat template; pass a named --template (e.g. chatml)"
        )
    return ChatTemplate(tokenizer, default_system or "")


def _chat_messages(messages: list[tuple[str, str]], system: str) -> list[dict]:
    """OpenAI-style messages: observations become ``tool`` messages, function calls ``tool_calls``."""
    chat = [{"role": "system", "content": system}] if system else []
    for role, content in messages:
        if role == "observation":
            chat.append({"role": "tool", "content": content})
        elif role == "function":
            chat.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(content)})
        else:
            chat.append({"role": role, "content": content})
    return chat


def _tool_calls(content: str) -> list[dict]:
    try:
        parsed = json.loads(content)
        calls = parsed if isinstance(parsed, list) else [parsed]
        return [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError
        raise ChipspanError(
            f"function call {content[:60]!r} is not JSON with name and arguments: fix the dataset"
        ) from exc


def _tool_list(tools: str) -> list[dict] | None:
    if not tools:
        return None
    try:
        parsed = json.loads(tools)
    except (ValueError, RecursionError) as exc:
        raise ChipspanError(f"tools column is not JSON ({str(exc)[:100]}): fix the dataset's tools text") from exc
    if not (isinstance(parsed, list) and all(isinstance(t, dict) for t in parsed)):
        raise ChipspanError("tools column is not a JSON list of function schemas: fix the dataset")
    return [t if t.get("type") == "function" else {"type": "function", "function": t} for t in parsed] or None
