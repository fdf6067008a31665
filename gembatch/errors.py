"""Errors a user can fix, with the message that tells them how.

Why: a user mistake (missing file, bad line, locked ledger, no API key) must end in one
clear sentence and a non-zero exit, never a traceback. Code raises `UserError` and the
command line turns it into that sentence.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; `str()` is the whole message (what, where, what to do)."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
