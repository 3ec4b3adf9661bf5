"""User-facing errors: one line that says what is wrong and how to fix it."""


class ChipspanError(Exception):
    """A problem with the user's input or environment.

    The CLI prints its message as a single line (no traceback unless ``--debug``) and exits 1.
    Raise it before any heavy work starts, so a failed run leaves nothing half-done behind.
    """
