"""The one exception type users see: a clear, one-line message and exit code 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input that the user can fix (a file, a field, a flag).

    The CLI prints ``error: <message>`` on one line and exits with code 2; no
    traceback. Messages name the file (and line or field) at fault.
    """

    exit_code = 2
