"""Tiling arithmetic: cut a (rescaled) image into overlapping chips and clip boxes to them.

Pure functions on numbers, so the geometry is testable without images.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from rsdet_compress.data.record import Box
from rsdet_compress.errors import UserError

#: Most tiles (chips, or predict's sliced windows) one image may be cut into. A 20,000 px
#: square scene in 640 px tiles at 50 % overlap gives ~3,900, so real work stays below it;
#: an overlap near 1 (0.999 -> a 1 px step) gives millions of tiles and once wrote 28 GB in
#: 10 minutes from 6 images. Refused up front, before any pixel is read or written.
MAX_TILES_PER_IMAGE = 10_000


@dataclass(frozen=True)
class Tile:
    """A window ``[x0, x0 + w) x [y0, y0 + h)`` in rescaled-image pixels."""

    x0: int
    y0: int
    w: int
    h: int


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets covering ``length`` with windows of ``tile`` overlapping by ``overlap`` (0..<1).

    The last window is aligned to the end, so every tile is full-size and
    nothing is padded; an image shorter than the tile gives one window.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length <= tile:
        return [0]
    step = max(1, int(round(tile * (1.0 - overlap))))
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _count(length: int, tile: int, overlap: float) -> int:
    """``len(tile_starts(length, tile, overlap))`` without building the list."""
    if length <= tile:
        return 1
    step = max(1, int(round(tile * (1.0 - overlap))))
    n = (length - tile) // step + 1
    return n + (1 if (n - 1) * step + tile < length else 0)


def tile_count(width: int, height: int, tile: int, overlap: float) -> int:
    """How many tiles :func:`tile_grid` cuts a ``width`` x ``height`` image into (pure arithmetic)."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return _count(width, tile, overlap) * _count(height, tile, overlap)


def check_tile_count(width: int, height: int, tile: int, overlap: float, image: object = "",
                     option: str = "--overlap") -> int:
    """The tile count, or one line naming ``option`` and the count if it exceeds MAX_TILES_PER_IMAGE."""
    n = tile_count(width, height, tile, overlap)
    if n > MAX_TILES_PER_IMAGE:
        what = f"{image}: " if image else ""
        raise UserError(f"{what}{option} {overlap} cuts this {width}x{height} image into {n:,} tiles of "
                        f"{tile} px (limit {MAX_TILES_PER_IMAGE:,} per image); lower {option} or raise the tile size")
    return n


def tile_grid(width: int, height: int, tile: int, overlap: float) -> list[Tile]:
    """All tiles of a ``width`` x ``height`` image, row by row."""
    tw, th = min(tile, width), min(tile, height)
    return [Tile(x, y, tw, th) for y in tile_starts(height, tile, overlap)
            for x in tile_starts(width, tile, overlap)]


def scale_box(box: Box, s: float) -> Box:
    """The box in an image rescaled by ``s``."""
    return Box(box.x1 * s, box.y1 * s, box.x2 * s, box.y2 * s, box.cls, box.difficult)


def boxes_in_tile(boxes: list[Box], tile: Tile, min_visibility: float,
                  dropped: Counter | None = None) -> list[Box]:
    """Boxes clipped to ``tile``, in tile coordinates.

    A box whose visible part is less than ``min_visibility`` of its area is
    dropped (a sliver of a plane at a tile edge teaches the detector nothing
    but noise); such drops are counted in ``dropped``.
    """
    out = []
    x2t, y2t = tile.x0 + tile.w, tile.y0 + tile.h
    for b in boxes:
        ix1, iy1, ix2, iy2 = max(b.x1, tile.x0), max(b.y1, tile.y0), min(b.x2, x2t), min(b.y2, y2t)
        if ix2 <= ix1 or iy2 <= iy1:
            continue  # not in this tile at all
        if (ix2 - ix1) * (iy2 - iy1) < min_visibility * b.area:
            if dropped is not None:
                dropped["box mostly outside a tile dropped"] += 1
            continue
        out.append(Box(ix1 - tile.x0, iy1 - tile.y0, ix2 - tile.x0, iy2 - tile.y0, b.cls, b.difficult))
    return out
