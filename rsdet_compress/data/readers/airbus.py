"""Airbus aircraft CSV: ``id,image_id,geometry,class`` with closed rectangle polygons in pixels."""
from __future__ import annotations

import csv
import io
import re
from collections import Counter, defaultdict
from pathlib import Path

from rsdet_compress.data.readers import register_reader
from rsdet_compress.data.record import BoxSanitizer, DetectionSet, ImageChecker, ImageRecord, list_images
from rsdet_compress.errors import UserError
from rsdet_compress.textio import read_text

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
#: Folders holding images without annotations (the Airbus sample ships such "extras").
UNANNOTATED_DIRS = {"extras"}


def parse_polygon(text: str, where: str) -> tuple[float, float, float, float]:
    """``"[(x, y), ...]"`` -> (x1, y1, x2, y2), the polygon's axis-aligned bounds."""
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise UserError(f"{where}: geometry must look like '[(x, y), ...]', got {text[:40]!r}")
    pairs = re.findall(r"\(([^()]*)\)", body)
    if len(pairs) < 3:
        raise UserError(f"{where}: geometry needs at least 3 points, got {len(pairs)}")
    xs, ys = [], []
    for p in pairs:
        nums = p.split(",")
        if len(nums) != 2 or not all(_NUMBER.fullmatch(n.strip()) for n in nums):
            raise UserError(f"{where}: point '({p})' is not two numbers")
        xs.append(float(nums[0]))
        ys.append(float(nums[1]))
    return min(xs), min(ys), max(xs), max(ys)


@register_reader("airbus")
def read_airbus(src: Path, classes: list[str] | None = None, csv_name: str = "annotations.csv",
                max_bad_images: float = 0.05) -> DetectionSet:
    """Read ``src/annotations.csv``; images are found by name anywhere under ``src``."""
    csv_path = src / csv_name
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: annotation CSV not found")
    rows: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    reader = csv.DictReader(io.StringIO(read_text(csv_path, "annotation CSV"), newline=""))
    try:
        missing = {"image_id", "geometry", "class"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            if not row.get("image_id") or not row.get("geometry") or not row.get("class"):
                raise UserError(f"{csv_path}:{reader.line_num}: empty image_id, geometry or class")
            rows[row["image_id"]].append((reader.line_num, row["geometry"], row["class"]))
    except csv.Error as e:
        raise UserError(f"{csv_path}:{reader.line_num}: malformed CSV ({e})") from None
    if not rows:
        raise UserError(f"{csv_path}: no annotation rows")
    found_classes = sorted({c for rs in rows.values() for _, _, c in rs})
    classes = classes or found_classes
    unknown = set(found_classes) - set(classes)
    if unknown:
        raise UserError(f"{csv_path}: class(es) {sorted(unknown)} not in the class list {classes}")
    index = {p.name: p for p in list_images(src) if not UNANNOTATED_DIRS & set(p.relative_to(src).parts)}
    warnings: Counter = Counter()
    sanitize, checker = BoxSanitizer(len(classes), warnings), ImageChecker(warnings, max_bad_images)
    records = []
    for image_id in sorted(rows):
        if image_id not in index:
            raise UserError(f"{csv_path}:{rows[image_id][0][0]}: image {image_id!r} not found under {src}")
        wh = checker.size(index[image_id])
        if wh is None:
            continue
        boxes = []
        for line, geom, cls in rows[image_id]:
            where = f"{csv_path}:{line}"
            box = sanitize(*parse_polygon(geom, where), classes.index(cls), *wh, where=where)
            if box is not None:
                boxes.append(box)
        records.append(ImageRecord(index[image_id], wh[0], wh[1], boxes))
    checker.finish()
    unannotated = len(index) - len(rows)
    if unannotated > 0:
        warnings["image without annotation rows ignored"] += unannotated
    return DetectionSet(src.name, classes, records, warnings)
