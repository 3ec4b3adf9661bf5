"""`chipspan chat`: a conversation with the engine, streamed as it is generated.

Interactive: each line of stdin is a user message; ``clear`` forgets the history, ``exit`` (or
end of input) quits. ``--prompt``: one answer on stdout, then exit. Notes go to stderr.
"""

from __future__ import annotations

import sys
from typing import TextIO

from chipspan.errors import ChipspanError
from chipspan.infer.engine import Engine


class ChatSession:
    """A conversation kept as (role, content) turns, answered by ``engine``."""

    def __init__(self, engine: Engine, system: str | None = None):
        self.engine, self.system = engine, system
        self.turns: list[tuple[str, str]] = []

    def reply(self, message: str, out: TextIO | None = None) -> str:
        """Answer ``message``, writing the answer to ``out`` as it is generated (then a newline);
        the exchange joins the history."""

        def show(piece: str) -> None:
            out.write(piece)
            out.flush()

        asked = [*self.turns, ("user", message)]
        answer = self.engine.generate(asked, self.system, on_text=show if out is not None else None).text
        if out is not None:
            show("\n")
        self.turns = [*asked, ("assistant", answer)]
        return answer

    def clear(self) -> None:
        self.turns = []


def interact(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
    """Read messages line by line until ``exit`` or end of input; ``clear`` resets the history.
    On a terminal, ``User:``/``Assistant:`` prompts frame the turns."""
    terminal = stdin.isatty()
    if terminal:
        print("chipspan chat: type a message; clear forgets the history, exit quits", file=stderr)
    while True:
        if terminal:
            stdout.write("\nUser: ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        message = line.rstrip("\n")
        if message.strip() == "exit":
            break
        if message.strip() == "clear":
            session.clear()
            print("history cleared", file=stderr)
            continue
        if not message.strip():
            continue
        if terminal:
            stdout.write("Assistant: ")
        try:
            session.reply(message, stdout)
        except ChipspanError as exc:  # the session goes on
            print(f"chipspan: error: {exc}", file=stderr)


def run_chat(engine: Engine, prompt: str | None, system: str | None) -> None:
    session = ChatSession(engine, system)
    if prompt is not None:
        session.reply(prompt, sys.stdout)
        return
    interact(session, sys.stdin, sys.stdout, sys.stderr)
