"""The one error base class for input a user can fix (a bad key, a missing path, a wrong checkpoint,
unusable data): every job prints `error: <message>` on one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, named in the message; never a traceback."""

    exit_code = 2
