"""Dataset rows -> conversations. Alpaca format, as LLaMA-Factory at the seed commit read it.

An alpaca row has an instruction (``prompt``), an optional input (``query``) appended after a newline,
an answer (``response``: one string, or a list of candidate answers), optional earlier turns
(``history``: ``[[user, assistant], ...]``) and an optional ``system`` prompt. ``columns`` in
``dataset_info.json`` renames them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Column names when an entry has no "columns"; with "columns", only the ones it names are read.
ALPACA_DEFAULT_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
ALPACA_COLUMN_KEYS = ("prompt", "query", "response", "history", "system")


class BadRow(ValueError):
    """A row that cannot be used; the message says why in a few words."""


@dataclass(frozen=True)
class Conversation:
    """One row: ``prompt`` messages ``(role, content)``, user/assistant alternating and ending with
    a user message; ``response`` the candidate answers (SFT needs exactly one); ``system`` ("" for
    the template's default)."""

    prompt: tuple[tuple[str, str], ...]
    response: tuple[str, ...]
    system: str = ""


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

    system = field("system") or ""
    if not isinstance(system, str):
        raise BadRow(f"{columns['system']} is {_kind(system)}")
    return Conversation(tuple(prompt), tuple(answers), system)


def _kind(value: object) -> str:
    return "missing" if value is None else f"not text ({type(value).__name__})"
