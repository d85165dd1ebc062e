"""Command line: ``rsdet-compress`` (main.py) and its sub-command modules."""
from __future__ import annotations

import argparse
from collections.abc import Callable


def comma_list(kind: Callable[[str], object], name: str) -> Callable[[str], tuple]:
    """argparse type: 'a,b,c' -> a tuple of ``kind`` values, or a clean usage error naming ``name``."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {name}, got {text!r}") from None
    return parse
