"""YOLO txt labels: ``class xc yc w h`` (normalised) per line, names from classes.txt or a YAML."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from rsdet_compress.data.readers import read_class_file, register_reader
from rsdet_compress.data.record import BoxSanitizer, DetectionSet, ImageChecker, ImageRecord, list_images, parse_names
from rsdet_compress.errors import UserError
from rsdet_compress.textio import read_text

#: Class-name files (labelImg writes classes.txt into the labels folder: not an orphan label file).
CLASS_FILES = ("classes.txt", "names.txt", "obj.names")
#: A normalised coordinate above this is not a box slightly past the border (clipped and counted)
#: but a label written in pixels: every such box would land outside the image and be dropped.
PIXEL_LIKE = 2.0


def _yolo_classes(src: Path) -> list[str]:
    for name in CLASS_FILES:
        if (src / name).is_file():
            return read_class_file(src / name)
    for y in sorted(src.glob("*.yaml")) + sorted(src.glob("*.yml")):
        try:
            data = yaml.safe_load(read_text(y, "YAML file"))
        except yaml.YAMLError as e:
            raise UserError(f"{y}: invalid YAML ({str(e).splitlines()[0]})") from None
        names = parse_names(data.get("names"), str(y)) if isinstance(data, dict) else None
        if names:
            return names
    raise UserError(f"{src}: no classes.txt and no YAML with 'names' found")


def _label_path(img: Path, images_dir: Path, labels_dir: Path) -> Path:
    return (labels_dir / img.relative_to(images_dir)).with_suffix(".txt")


def parse_yolo_label(path: Path, w: int, h: int, sanitize: BoxSanitizer) -> list:
    """Parse one label file into boxes; malformed rows raise with file:line."""
    boxes = []
    for n, line in enumerate(read_text(path, "label file").splitlines(), start=1):
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
        if max(xc, yc, bw, bh) > PIXEL_LIKE:
            raise UserError(f"{path}:{n}: coordinates look like pixels ({line.strip()!r}); YOLO labels are "
                            "'class xc yc w h' normalised to 0..1 by the image width and height")
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
    records, images = [], list_images(images_dir)
    for img in images:
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
    used = {_label_path(img, images_dir, labels_dir) for img in images}
    orphans = [p for p in labels_dir.rglob("*.txt") if p not in used and p.name not in CLASS_FILES]
    if orphans:  # an image renamed or deleted: its boxes are lost, so say so
        warnings["label file without image ignored"] += len(orphans)
    return DetectionSet(src.name, classes, records, warnings)
