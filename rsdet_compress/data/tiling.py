"""Tiling arithmetic: cut a (rescaled) image into overlapping chips and clip boxes to them.

Pure functions on numbers, so the geometry is testable without images.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from rsdet_compress.data.record import Box


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
