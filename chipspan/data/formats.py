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
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

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
# The side of the conversation each role tag is on; the templates render it as that side.
_SHAREGPT_SIDES = {
    "user_tag": "user",
    "observation_tag": "user",
    "assistant_tag": "assistant",
    "function_tag": "assistant",
}


class BadRow(ValueError):
    """A row that cannot be used; the message says why in a few words."""


@dataclass(frozen=True)
class Conversation:
    """One row: ``prompt`` messages ``(role, content)``, user/assistant alternating and ending with
    a user message; ``response`` the candidate answers (SFT needs exactly one); ``system`` ("" for
    the template's default); ``tools`` the sharegpt row's tool descriptions ("" for none), not
    rendered yet: the templates have no tool slots."""

    prompt: tuple[tuple[str, str], ...]
    response: tuple[str, ...]
    system: str = ""
    tools: str = ""


@dataclass(frozen=True)
class SharegptSpec:
    """Where a sharegpt row keeps its parts: the ``messages``/``system``/``tools`` columns, the
    messages' ``role_key``/``content_key``, ``sides`` (role value -> "user" or "assistant") and
    ``system_role`` (the role value of a leading system message; None: none is taken)."""

    messages: str
    system: str | None
    tools: str | None
    role_key: str | None
    content_key: str | None
    sides: dict[str, str]
    system_role: str | None


def converter(formatting: str, columns: dict | None, tags: dict | None) -> Callable[[object], Conversation]:
    """The function that turns one row of a dataset with this ``formatting`` into a conversation."""
    if formatting == "sharegpt":
        return partial(from_sharegpt, spec=sharegpt_spec(columns, tags))
    return partial(from_alpaca, columns=alpaca_columns(columns))


def alpaca_columns(entry_columns: dict | None) -> dict[str, str | None]:
    """Which field of a row holds each part, from an entry's ``columns`` (None: the defaults)."""
    if entry_columns is None:
        return {key: ALPACA_DEFAULT_COLUMNS.get(key) for key in ALPACA_COLUMN_KEYS}
    return {key: entry_columns.get(key) for key in ALPACA_COLUMN_KEYS}


def from_alpaca(row: object, columns: dict[str, str | None]) -> Conversation:
    """The conversation in one alpaca row; raises ``BadRow`` for missing or non-text fields.

    A field the row lacks counts as null. Empty strings are kept (the seed trained on them).
    """
    if not isinstance(row, dict):
        raise BadRow("row is not a JSON object")

    def field(key: str):
        return row.get(columns[key]) if columns[key] else None

    prompt: list[tuple[str, str]] = []
    for turn in field("history") or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise BadRow("history is not a list of [user, assistant] text pairs")
        prompt += [("user", turn[0]), ("assistant", turn[1])]

    instruction, query = field("prompt"), field("query")
    if not isinstance(instruction, str):
        raise BadRow(f"{columns['prompt'] or 'prompt'} is {_kind(instruction)}")
    if query:
        if not isinstance(query, str):
            raise BadRow(f"{columns['query']} is {_kind(query)}")
        instruction += "\n" + query
    prompt.append(("user", instruction))

    answer = field("response")
    answers = answer if isinstance(answer, list) else [] if answer is None else [answer]
    if not all(isinstance(a, str) for a in answers):
        raise BadRow(f"{columns['response']} is not text")

    return Conversation(tuple(prompt), tuple(answers), _optional_text(row, columns["system"]))


def sharegpt_spec(entry_columns: dict | None, entry_tags: dict | None) -> SharegptSpec:
    """How to read an entry's sharegpt rows, from its ``columns`` and ``tags`` (None: the defaults)."""
    columns = entry_columns or {}
    tags = SHAREGPT_DEFAULT_TAGS if entry_tags is None else entry_tags
    sides = {tags[tag]: side for tag, side in _SHAREGPT_SIDES.items() if tags.get(tag) is not None}
    return SharegptSpec(
        messages=columns.get("messages", "conversations"),
        system=columns.get("system"),
        tools=columns.get("tools"),
        role_key=tags.get("role_tag"),
        content_key=tags.get("content_tag"),
        sides=sides,
        system_role=tags.get("system_tag"),
    )


def from_sharegpt(row: object, spec: SharegptSpec) -> Conversation:
    """The conversation in one sharegpt row; raises ``BadRow`` when it cannot be trained on.

    Observation turns are rendered as user turns and function-call turns as assistant turns: the
    templates have no tool slots yet (LLaMA-Factory formats those turns, and the tools, its own way).
    """
    if not isinstance(row, dict):
        raise BadRow("row is not a JSON object")
    messages = row.get(spec.messages)
    if not isinstance(messages, list):
        raise BadRow(f"{spec.messages} is {'missing' if messages is None else 'not a list'}")
    if not all(isinstance(m, dict) and isinstance(m.get(spec.content_key), str) for m in messages):
        raise BadRow(f"a message is not an object with text {spec.content_key}")
    system = _optional_text(row, spec.system)
    if messages and spec.system_role is not None and messages[0].get(spec.role_key) == spec.system_role:
        system, messages = messages[0][spec.content_key], messages[1:]
    turns = [(_side(message, spec), message[spec.content_key]) for message in messages]
    if any(side != ("user", "assistant")[i % 2] for i, (side, _) in enumerate(turns)):
        raise BadRow("roles do not alternate user/assistant")
    if not turns:
        raise BadRow("has no messages")
    if turns[-1][0] != "assistant":
        raise BadRow("ends without an assistant turn")
    return Conversation(tuple(turns[:-1]), (turns[-1][1],), system, _optional_text(row, spec.tools))


def _side(message: dict, spec: SharegptSpec) -> str | None:
    """The side ("user" or "assistant") a message's role is on; None for a system message."""
    role = message.get(spec.role_key)
    side = spec.sides.get(role) if isinstance(role, str) else None
    if side is None and role != spec.system_role:
        raise BadRow("a message has an unknown role")
    return side


def _optional_text(row: dict, column: str | None) -> str:
    """The text in ``column`` of ``row``; "" when there is no such column or its value is falsy."""
    value = (row.get(column) if column else None) or ""
    if not isinstance(value, str):
        raise BadRow(f"{column} is {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return "missing" if value is None else f"not text ({type(value).__name__})"
