"""User-facing errors: one line that says what is wrong and how to fix it."""


class ChipspanError(Exception):
    """A problem with the user's input or environment.

    The CLI prints its message as a single line (no traceback unless ``--debug``) and exits 1.
    Raise it before any heavy work starts, so a failed run leaves nothing half-done behind.
    """


def shown(value: object, limit: int = 40) -> str:
    """``value`` as an error line quotes it: its text, cut to ``limit`` characters."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
