"""The internal record type every reader produces: images with axis-aligned pixel boxes."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rsdet_compress.data.imageio import CorruptImage, image_size
from rsdet_compress.errors import UserError


@dataclass(frozen=True)
class Box:
    """One axis-aligned box in pixel coordinates of its image (x2 > x1, y2 > y1)."""

    x1: float
    y1: float
    x2: float
    y2: float
    cls: int
    #: DOTA/VOC "difficult": kept in labels, ignored (iscrowd) by the COCO evaluator.
    difficult: bool = False

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)


@dataclass
class ImageRecord:
    """One source image and its boxes (tiles of one image stay in one split: ``prepare.source_names``)."""

    path: Path
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)


@dataclass
class DetectionSet:
    """What a reader returns: class names, images, and counted skips (warnings)."""

    name: str
    classes: list[str]
    images: list[ImageRecord]
    #: reason -> count of skipped or repaired items (degenerate boxes, corrupt images...).
    warnings: Counter = field(default_factory=Counter)

    def box_count(self) -> Counter:
        """Boxes per class name."""
        c: Counter = Counter()
        for im in self.images:
            for b in im.boxes:
                c[self.classes[b.cls]] += 1
        return c


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def list_images(folder: Path) -> list[Path]:
    """All image files under ``folder`` (recursive), sorted for determinism."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def parse_names(names: object, where: str) -> list[str] | None:
    """Class names from a YAML ``names:`` (a list, or a mapping of class id -> name), or None if absent.

    A mapping must use the ids 0..n-1: with a gap (``{0: car, 2: bus}``) label id 1
    would silently become "bus" once the names are put in a list.
    """
    if names is None:
        return None
    if isinstance(names, dict):
        if sorted(names, key=repr) != sorted(range(len(names)), key=repr):
            raise UserError(f"{where}: 'names' keys must be the class ids 0..{len(names) - 1}, "
                            f"got {list(names)}")
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list) or not names:
        raise UserError(f"{where}: field 'names' must be a non-empty list or id -> name mapping")
    return [str(n) for n in names]


def check_declared_size(where: str, declared: tuple[object, object], actual: tuple[int, int],
                        image: Path) -> None:
    """Refuse an annotation whose stated image size differs from the image as decoded: its boxes
    were drawn on other pixels (a resized copy, or the un-rotated frame of an EXIF-rotated photo)."""
    w, h = declared
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        return  # not stated (VOC tools often write 0): nothing to compare
    if (round(w), round(h)) == actual:
        return
    hint = (" (the un-rotated size: labels drawn without the EXIF orientation, which every decoder here applies)"
            if (round(h), round(w)) == actual else "")
    raise UserError(f"{where}: image size given as {w}x{h}, but {image} is {actual[0]}x{actual[1]}{hint}")


class BoxSanitizer:
    """Clips boxes to their image, drops degenerate ones, and counts what it did.

    Degenerate (zero/negative size) and fully out-of-image boxes are skipped
    with a counted warning, as users of large aerial sets expect; a class id
    out of range is an error naming the file and line.
    """

    def __init__(self, num_classes: int, warnings: Counter):
        self.num_classes = num_classes
        self.warnings = warnings

    def __call__(self, x1: float, y1: float, x2: float, y2: float, cls: int, w: int, h: int,
                 where: str, difficult: bool = False) -> Box | None:
        if not 0 <= cls < self.num_classes:
            raise UserError(f"{where}: class id {cls} out of range 0..{self.num_classes - 1}")
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise UserError(f"{where}: non-finite box coordinate (nan or inf)")
        if x2 <= x1 or y2 <= y1:
            self.warnings["degenerate box skipped"] += 1
            return None
        cx1, cy1, cx2, cy2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
        if cx2 <= cx1 or cy2 <= cy1:
            self.warnings["out-of-image box skipped"] += 1
            return None
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            self.warnings["box clipped to image"] += 1
        return Box(cx1, cy1, cx2, cy2, cls, difficult)


class ImageChecker:
    """Reads image sizes; skips a few corrupt images with a count, fails if too many are bad."""

    def __init__(self, warnings: Counter, max_bad_fraction: float = 0.05):
        self.warnings = warnings
        self.max_bad_fraction = max_bad_fraction
        self.bad: list[Path] = []
        self.seen = 0

    def size(self, path: Path) -> tuple[int, int] | None:
        """(width, height) as displayed (see :mod:`imageio`), or None for a skipped corrupt image."""
        self.seen += 1
        try:
            return image_size(path)
        except CorruptImage:
            self.bad.append(path)
            self.warnings["corrupt image skipped"] += 1
            return None

    def finish(self) -> None:
        """Raise if more than ``max_bad_fraction`` of the images were unreadable."""
        if self.bad and len(self.bad) > self.max_bad_fraction * self.seen:
            raise UserError(f"{self.bad[0]}: unreadable or corrupt image "
                            f"({len(self.bad)} of {self.seen} images bad)")
