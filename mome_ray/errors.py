"""User-facing errors.

A `MomeError` says what was wrong and what to do; the CLI prints its message (no traceback) and exits 2.
Anything else escaping a stage is a bug.
"""


class MomeError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""
