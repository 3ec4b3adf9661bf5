"""Dataset rows -> conversations, in LLaMA-Factory's alpaca and sharegpt formats.

An alpaca row has an instruction (``prompt``), an optional input (``query``) appended after a newline,
an answer (``response``: one string, or a list of candidate answers), optional earlier turns
(``history``: ``[[user, assistant], ...]``) and an optional ``system`` prompt. ``columns`` in
``dataset_info.json`` renames them.

A sharegpt row has a list of messages (``messages`` column, "conversations" by default), each an
object with a role and a content key, and optional ``system`` and ``tools`` columns; ``tags`` in
``dataset_info.json`` name the keys and role values. OpenAI-style rows (``role``/``content`` with
user/assistant/system/tool) are sharegpt rows with tags that say so. Rows are read as LLaMA-Factory
0.9 reads them: a leading system message is the system prompt, the turns must alternate user-side
(user, observation) and assistant-side (assistant, function call) and end on the assistant side.
As LLaMA-Factory 0.9 reads OpenAI rows, an assistant message with ``tool_calls`` is a function call
(its content the JSON list of the calls' ``function`` objects) and consecutive tool results are one
observation, joined by ``\n</tool_response>\n<tool_response>\n``.

A row longer than ``MAX_ROW_CHARS`` characters of text, or with more than ``MAX_ROW_MESSAGES`` messages,
is a bad row (dropped and counted), not tokenized: real rows are far shorter, and such a row is a
broken or hostile file that would otherwise take gigabytes to encode. ``--template auto`` renders the
conversation up to each answer, so there a row's answers times its characters are bounded too
(``MAX_AUTO_RENDER``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

# Column names when an entry has no "columns"; with "columns", only the ones it names are read.
ALPACA_DEFAULT_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
ALPACA_COLUMN_KEYS = ("prompt", "query", "response", "history", "system")
# Tag values when an entry has no "tags"; with "tags", only the ones it names are used (as in
# LLaMA-Factory, where a tag the entry leaves out is None).
SHAREGPT_DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# The message role of each role tag.
_SHAREGPT_ROLES = {
    "user_tag": "user",
    "observation_tag": "observation",
    "assistant_tag": "assistant",
    "function_tag": "function",
}
# The side of the conversation each role is on: turns alternate user side, assistant side.
SIDES = {"user": "user", "observation": "user", "assistant": "assistant", "function": "assistant"}
_JOINED_TOOL_RESULTS = "\n</tool_response>\n<tool_response>\n"
MAX_ROW_CHARS = 2_000_000  # about 500k tokens
MAX_ROW_MESSAGES = 2_000
MAX_AUTO_RENDER = 200_000_000  # answers x characters of one row under --template auto
# LLaMA-Factory 0.9's media columns: chipspan trains text models, so data in them is refused, never dropped.
MEDIA_COLUMNS = ("images", "videos", "audios")
TEXT_ONLY = (
    "chipspan trains text models only and would drop them: remove the column from the entry and the "
    "rows (placeholders such as <image> in the text then stay plain text) or pick a text dataset"
)


class BadRow(ValueError):
    """A row that cannot be used; the message says why in a few words."""


@dataclass(frozen=True)
class Conversation:
    """One row: ``prompt`` messages ``(role, content)`` with roles user/observation and
    assistant/function alternating, ending on the user side; ``response`` the candidate answers (SFT
    needs exactly one), each a message of role ``response_role`` (assistant, or function for a row
    that ends in a function call); ``system`` ("" for the template's default); ``tools`` the row's
    tool schemas as JSON text ("" for none)."""

    prompt: tuple[tuple[str, str], ...]
    response: tuple[str, ...]
    system: str = ""
    tools: str = ""
    response_role: str = "assistant"

    def messages(self) -> list[tuple[str, str]]:
        """The prompt and the (first) response, as one message list."""
        return [*self.prompt, (self.response_role, self.response[0])]

    def chars(self) -> int:
        """Characters of text in the row: messages, answers, system prompt and tools."""
        return (
            sum(len(text) for _, text in self.prompt)
            + sum(map(len, self.response))
            + len(self.system)
            + len(self.tools)
        )


@dataclass(frozen=True)
class SharegptSpec:
    """Where a sharegpt row keeps its parts: the ``messages``/``system``/``tools`` columns, the
    messages' ``role_key``/``content_key``, ``roles`` (role value -> user, observation, assistant or
    function) and ``system_role`` (the role value of a leading system message; None: none is taken)."""

    messages: str
    system: str | None
    tools: str | None
    role_key: str | None
    content_key: str | None
    roles: dict[str, str]
    system_role: str | None


def converter(
    formatting: str, columns: dict | None, tags: dict | None, revision: str = "lf-0.5"
) -> Callable[[object], Conversation]:
    """The function that turns one row of a dataset with this ``formatting`` into a conversation,
    read as the template ``revision`` ("lf-0.5", "lf-0.9" or "auto") reads it, within the row limits."""
    if formatting == "sharegpt":
        convert = partial(from_sharegpt, spec=sharegpt_spec(columns, tags))
    else:
        convert = partial(from_alpaca, columns=alpaca_columns(columns), skip_empty_parts=revision != "lf-0.5")
    return lambda row: within_limits(convert(row), auto=revision == "auto")


def within_limits(conversation: Conversation, auto: bool = False) -> Conversation:
    """``conversation``, or ``BadRow`` when it has more than ``MAX_ROW_MESSAGES`` messages or
    ``MAX_ROW_CHARS`` characters (messages, answers, system prompt and tools together), or, for
    ``--template auto`` (``auto``), answers times characters above ``MAX_AUTO_RENDER``."""
    if len(conversation.prompt) + 1 > MAX_ROW_MESSAGES:
        raise BadRow(f"has more than {MAX_ROW_MESSAGES:,} messages")
    chars = conversation.chars()
    if chars > MAX_ROW_CHARS:
        raise BadRow(f"has more than {MAX_ROW_CHARS:,} characters")
    answers = 1 + sum(SIDES[role] == "assistant" for role, _ in conversation.prompt)
    if auto and answers * chars > MAX_AUTO_RENDER:
        raise BadRow(f"is too long for --template auto (answers x characters above {MAX_AUTO_RENDER:,})")
    return conversation


def media_column(row: object, entry_columns: dict | None) -> str | None:
    """The first media column (``MEDIA_COLUMNS``, by its own name) that holds something in ``row``;
    None when none does or the entry's ``columns`` read that name as text."""
    if not isinstance(row, dict):
        return None
    text_columns = set((entry_columns or {}).values())
    return next((c for c in MEDIA_COLUMNS if c not in text_columns and row.get(c) not in (None, "", [], {})), None)


def alpaca_columns(entry_columns: dict | None) -> dict[str, str | None]:
    """Which field of a row holds each part, from an entry's ``columns`` (None: the defaults)."""
    if entry_columns is None:
        return {key: ALPACA_DEFAULT_COLUMNS.get(key) for key in ALPACA_COLUMN_KEYS}
    return {key: entry_columns.get(key) for key in ALPACA_COLUMN_KEYS}


def from_alpaca(row: object, columns: dict[str, str | None], skip_empty_parts: bool = False) -> Conversation:
    """The conversation in one alpaca row; raises ``BadRow`` for missing or non-text fields.

    A field the row lacks counts as null. Empty strings are kept (LLaMA-Factory 0.5 trained on them). The
    user turn is the instruction, then a newline and the input when there is one; LLaMA-Factory 0.5 needs an
    instruction and keeps an empty one ("\ninput"), while LLaMA-Factory 0.9 (``skip_empty_parts``)
    joins only the parts that are there ("input").
    """
    if not isinstance(row, dict):
        raise BadRow("row is not a JSON object")

    def field(key: str):
        return row.get(columns[key]) if columns[key] else None

    prompt: list[tuple[str, str]] = []
    history = field("history") or []
    if not isinstance(history, list):
        raise BadRow("history is not a list of [user, assistant] text pairs")
    for turn in history:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise BadRow("history is not a list of [user, assistant] text pairs")
        prompt += [("user", turn[0]), ("assistant", turn[1])]

    instruction, query = field("prompt"), field("query")
    if not (isinstance(instruction, str) or (skip_empty_parts and instruction is None)):
        raise BadRow(f"{columns['prompt'] or 'prompt'} is {_kind(instruction)}")
    if query and not isinstance(query, str):
        raise BadRow(f"{columns['query']} is {_kind(query)}")
    if skip_empty_parts:
        text = "\n".join(part for part in (instruction, query) if part)
    else:
        text = instruction + "\n" + query if query else instruction
    prompt.append(("user", text))

    answer = field("response")
    answers = answer if isinstance(answer, list) else [] if answer is None else [answer]
    if not all(isinstance(a, str) for a in answers):
        raise BadRow(f"{columns['response']} is not text")

    return Conversation(tuple(prompt), tuple(answers), _optional_text(row, columns["system"]))


def sharegpt_spec(entry_columns: dict | None, entry_tags: dict | None) -> SharegptSpec:
    """How to read an entry's sharegpt rows, from its ``columns`` and ``tags`` (None: the defaults)."""
    columns = entry_columns or {}
    tags = SHAREGPT_DEFAULT_TAGS if entry_tags is None else entry_tags
    roles = {tags[tag]: role for tag, role in _SHAREGPT_ROLES.items() if tags.get(tag) is not None}
    return SharegptSpec(
        messages=columns.get("messages", "conversations"),
        system=columns.get("system"),
        tools=columns.get("tools"),
        role_key=tags.get("role_tag"),
        content_key=tags.get("content_tag"),
        roles=roles,
        system_role=tags.get("system_tag"),
    )


def from_sharegpt(row: object, spec: SharegptSpec) -> Conversation:
    """The conversation in one sharegpt row; raises ``BadRow`` when it cannot be trained on."""
    if not isinstance(row, dict):
        raise BadRow("row is not a JSON object")
    messages = row.get(spec.messages)
    if not isinstance(messages, list):
        raise BadRow(f"{spec.messages} is {'missing' if messages is None else 'not a list'}")
    if not all(isinstance(m, dict) for m in messages):
        raise BadRow(f"a message is not an object with text {spec.content_key}")
    system = _optional_text(row, spec.system)
    if messages and spec.system_role is not None and messages[0].get(spec.role_key) == spec.system_role:
        system, messages = messages[0].get(spec.content_key), messages[1:]
        if not isinstance(system, str):
            raise BadRow(f"the system message has no text {spec.content_key}")
    turns = _merge_tool_results([_turn(message, spec) for message in messages])
    if any(SIDES[role] != ("user", "assistant")[i % 2] for i, (role, _) in enumerate(turns)):
        raise BadRow("roles do not alternate user/assistant")
    if not turns:
        raise BadRow("has no messages")
    if SIDES[turns[-1][0]] != "assistant":
        raise BadRow("ends without an assistant turn")
    role, answer = turns[-1]
    return Conversation(tuple(turns[:-1]), (answer,), system, _tools_text(row, spec.tools), role)


def _calls(message: dict) -> list | None:
    """An OpenAI message's ``tool_calls`` list, if it has one."""
    calls = message.get("tool_calls")
    return calls if isinstance(calls, list) and calls else None


def _turn(message: dict, spec: SharegptSpec) -> tuple[str, str]:
    """``(role, content)`` of a message; a system message (only allowed first) is refused here."""
    role_value = message.get(spec.role_key)
    role = spec.roles.get(role_value) if isinstance(role_value, str) else None
    if role is None:
        raise BadRow(
            "a message has an unknown role"
            if role_value != spec.system_role
            else "roles do not alternate user/assistant"
        )
    calls = _calls(message)
    if calls is not None and role in ("assistant", "function"):
        try:
            return "function", json.dumps([call["function"] for call in calls], ensure_ascii=False)
        except (KeyError, TypeError):
            raise BadRow("tool_calls are not objects with a function") from None
    if not isinstance(message.get(spec.content_key), str):
        raise BadRow(f"a message is not an object with text {spec.content_key}")
    return role, message[spec.content_key]


def _merge_tool_results(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Consecutive observations become one, as LLaMA-Factory 0.9 joins an OpenAI row's tool results."""
    merged: list[tuple[str, str]] = []
    for role, content in turns:
        if role == "observation" and merged and merged[-1][0] == "observation":
            merged[-1] = ("observation", merged[-1][1] + _JOINED_TOOL_RESULTS + content)
        else:
            merged.append((role, content))
    return merged


def _tools_text(row: dict, column: str | None) -> str:
    """The row's tools as JSON text: a JSON list or object in the column is written out."""
    value = row.get(column) if column else None
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return _optional_text(row, column)


def _optional_text(row: dict, column: str | None) -> str:
    """The text in ``column`` of ``row``; "" when there is no such column or its value is falsy."""
    value = (row.get(column) if column else None) or ""
    if not isinstance(value, str):
        raise BadRow(f"{column} is {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return "missing" if value is None else f"not text ({type(value).__name__})"
