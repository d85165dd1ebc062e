"""YOLO txt labels: ``class xc yc w h`` (normalised) per line, names from classes.txt or a YAML."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from rsdet_compress.data.readers import read_class_file, register_reader
from rsdet_compress.data.record import BoxSanitizer, DetectionSet, ImageChecker, ImageRecord, list_images
from rsdet_compress.errors import UserError


def _yolo_classes(src: Path) -> list[str]:
    for name in ("classes.txt", "names.txt", "obj.names"):
        if (src / name).is_file():
            return read_class_file(src / name)
    for y in sorted(src.glob("*.yaml")) + sorted(src.glob("*.yml")):
        names = (yaml.safe_load(y.read_text()) or {}).get("names")
        if isinstance(names, dict):
            return [str(names[k]) for k in sorted(names)]
        if isinstance(names, list):
            return [str(n) for n in names]
    raise UserError(f"{src}: no classes.txt and no YAML with 'names' found")


def _label_path(img: Path, images_dir: Path, labels_dir: Path) -> Path:
    return (labels_dir / img.relative_to(images_dir)).with_suffix(".txt")


def parse_yolo_label(path: Path, w: int, h: int, sanitize: BoxSanitizer) -> list:
    """Parse one label file into boxes; malformed rows raise with file:line."""
    boxes = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            raise UserError(f"{path}:{n}: expected 5 fields 'class xc yc w h', got {len(parts)}")
        try:
            cls = int(parts[0])
            xc, yc, bw, bh = (float(v) for v in parts[1:])
        except ValueError:
            raise UserError(f"{path}:{n}: non-numeric value in {line.strip()!r}") from None
        box = sanitize((xc - bw / 2) * w, (yc - bh / 2) * h, (xc + bw / 2) * w, (yc + bh / 2) * h,
                       cls, w, h, where=f"{path}:{n}")
        if box is not None:
            boxes.append(box)
    return boxes


@register_reader("yolo")
def read_yolo(src: Path, classes: list[str] | None = None, missing_labels: str = "error",
              max_bad_images: float = 0.05) -> DetectionSet:
    """Read ``src/images/**`` with labels in ``src/labels/**`` (same relative path, .txt).

    ``missing_labels``: "error" (default: a missing file is usually a mistake) or
    "empty" (treat the image as background, as ultralytics does).
    """
    images_dir, labels_dir = src / "images", src / "labels"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise UserError(f"{src}: YOLO layout needs images/ and labels/ folders")
    classes = classes or _yolo_classes(src)
    warnings: Counter = Counter()
    sanitize, checker = BoxSanitizer(len(classes), warnings), ImageChecker(warnings, max_bad_images)
    records = []
    for img in list_images(images_dir):
        lbl = _label_path(img, images_dir, labels_dir)
        if not lbl.is_file():
            if missing_labels != "empty":
                raise UserError(f"{lbl}: missing label file for image {img.name} "
                                "(use --missing-labels empty to treat such images as background)")
            warnings["image without label file (background)"] += 1
        wh = checker.size(img)
        if wh is None:
            continue
        boxes = parse_yolo_label(lbl, *wh, sanitize) if lbl.is_file() else []
        records.append(ImageRecord(img, wh[0], wh[1], boxes))
    checker.finish()
    if not records:
        raise UserError(f"{images_dir}: no images found")
    return DetectionSet(src.name, classes, records, warnings)
