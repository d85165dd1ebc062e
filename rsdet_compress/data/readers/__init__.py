"""Format readers: each turns a raw data set folder into one :class:`DetectionSet`.

A plain dict registry keyed by format name, filled by ``@register_reader``.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from rsdet_compress.data.record import DetectionSet
from rsdet_compress.errors import UserError
from rsdet_compress.textio import read_text

Reader = Callable[..., DetectionSet]
READERS: dict[str, Reader] = {}


def register_reader(name: str) -> Callable[[Reader], Reader]:
    """Register ``fn(src, classes=None, **options) -> DetectionSet`` under ``name``."""
    def deco(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn
    return deco


def read_dataset(fmt: str, src: str | Path, classes: list[str] | None = None, **options) -> DetectionSet:
    """Read ``src`` with the reader for ``fmt`` (yolo, coco, airbus, dota, voc)."""
    if fmt not in READERS:
        raise UserError(f"unknown --format {fmt!r}; choose one of: {', '.join(sorted(READERS))}")
    reader = READERS[fmt]
    params = inspect.signature(reader).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise UserError(f"reader {fmt!r} has no option(s) {', '.join(unknown)}")
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: data set folder does not exist")
    return reader(src, classes=classes, **options)


def read_class_file(path: Path) -> list[str]:
    """One class name per non-empty line (classes.txt / names.txt)."""
    names = [ln.strip() for ln in read_text(path, "class file").splitlines() if ln.strip()]
    if not names:
        raise UserError(f"{path}: class file is empty")
    return names


# Import the readers so that they register themselves.
from rsdet_compress.data.readers import airbus, coco, dota, voc, yolo  # noqa: E402,F401
