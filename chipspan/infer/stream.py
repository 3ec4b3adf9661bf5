"""Generated ids as text, piece by piece: only whole UTF-8 characters, and never text that may be
the start of a stop string (OpenAI's ``stop``), so what was shown never has to be taken back."""

from __future__ import annotations

from collections.abc import Sequence

from chipspan.models.tokenizer import Tokenizer


class TextStream:
    """Feed ids with :meth:`add`; each call returns the text that became final (maybe "").

    ``stopped`` turns true once the text holds a stop string; the text ends before it.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.text = ""  # the answer so far (cut before a stop string)
        self.shown = 0  # characters of ``text`` returned so far
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a character's bytes are still coming
            return ""
        return self._advance(text, final=False)

    def finish(self) -> str:
        """The text not yet returned, once generation has ended."""
        if self.stopped:
            return ""
        return self._advance(self.tokenizer.decode(self.ids), final=True)

    def _advance(self, text: str, final: bool) -> str:
        found = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if found:
            text, self.stopped, final = text[: max(min(found), self.shown)], True, True
        self.text = text
        end = len(text) if final else len(text) - self._held(text)
        piece = text[self.shown : max(end, self.shown)]
        self.shown += len(piece)
        return piece

    def _held(self, text: str) -> int:
        """Length of the longest end of ``text`` that a stop string starts with."""
        return max(
            (k for s in self.stop_strings for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
            default=0,
        )
