"""Reading label, CSV, class and JSON files as text: a bad file is one line naming it, never a traceback."""
from __future__ import annotations

from pathlib import Path

from rsdet_compress.errors import UserError

_BOM = b"\xef\xbb\xbf"


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark is accepted, as ultralytics does).

    A missing or unreadable file, or bytes that are not UTF-8 (a label file saved
    as Latin-1 or UTF-16 by an annotation tool), raise :class:`UserError` naming
    the file and, for bad bytes, the line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a {what}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                        "save the file as UTF-8") from None
