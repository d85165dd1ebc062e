"""The one exception type users see: a clear, one-line message and exit code 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input that the user can fix (a file, a field, a flag).

    The CLI prints ``error: <message>`` on one line and exits with code 2; no
    traceback. Messages name the file (and line or field) at fault.
    """

    exit_code = 2


def where(path: object, line: int | None = None) -> str:
    """Format a location as ``path`` or ``path:line`` for error messages."""
    return f"{path}:{line}" if line is not None else str(path)
