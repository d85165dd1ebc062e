"""DOTA labelTxt: ``x1 y1 x2 y2 x3 y3 x4 y4 class difficult`` (oriented quads -> axis-aligned boxes)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from rsdet_compress.data.readers import register_reader
from rsdet_compress.data.record import BoxSanitizer, DetectionSet, ImageChecker, ImageRecord, list_images
from rsdet_compress.errors import UserError
from rsdet_compress.textio import read_text

_HEADER_KEYS = ("imagesource:", "gsd:")


def parse_dota_rows(path: Path) -> list[tuple[int, list[float], str, bool]]:
    """(line, 8 coords, class name, difficult) for each object row; header lines skipped."""
    out = []
    for n, line in enumerate(read_text(path, "label file").splitlines(), start=1):
        s = line.strip()
        if not s or s.lower().startswith(_HEADER_KEYS):
            continue
        parts = s.split()
        if len(parts) not in (9, 10):
            raise UserError(f"{path}:{n}: expected 8 coordinates, class and difficult, got {len(parts)} fields")
        try:
            coords = [float(v) for v in parts[:8]]
            difficult = bool(int(parts[9])) if len(parts) == 10 else False
        except ValueError:
            raise UserError(f"{path}:{n}: non-numeric value in {s!r}") from None
        out.append((n, coords, parts[8], difficult))
    return out


@register_reader("dota")
def read_dota(src: Path, classes: list[str] | None = None, missing_labels: str = "error",
              max_bad_images: float = 0.05) -> DetectionSet:
    """Read ``src/images`` + ``src/labelTxt``. Quads become their axis-aligned bounds;
    the difficult flag is kept (the evaluator ignores such boxes, as DOTA's does)."""
    images_dir, labels_dir = src / "images", src / "labelTxt"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise UserError(f"{src}: DOTA layout needs images/ and labelTxt/ folders")
    parsed = {}
    for img in list_images(images_dir):
        lbl = labels_dir / f"{img.stem}.txt"
        if not lbl.is_file():
            if missing_labels != "empty":
                raise UserError(f"{lbl}: missing label file for image {img.name} "
                                "(use --missing-labels empty to treat such images as background)")
            parsed[img] = (lbl, [])
        else:
            parsed[img] = (lbl, parse_dota_rows(lbl))
    if not parsed:
        raise UserError(f"{images_dir}: no images found")
    used = {lbl for lbl, _ in parsed.values()}
    orphans = [p for p in labels_dir.glob("*.txt") if p not in used]
    warnings: Counter = Counter()
    if orphans:  # e.g. the DOTA devkit sample: labels of images it does not ship; their boxes are lost
        warnings["label file without image ignored"] += len(orphans)
    classes = classes or sorted({r[2] for _, rows in parsed.values() for r in rows})
    sanitize, checker = BoxSanitizer(len(classes), warnings), ImageChecker(warnings, max_bad_images)
    records = []
    for img, (lbl, rows) in parsed.items():
        wh = checker.size(img)
        if wh is None:
            continue
        boxes = []
        for n, c, name, difficult in rows:
            if name not in classes:
                raise UserError(f"{lbl}:{n}: class {name!r} not in the class list")
            xs, ys = c[0::2], c[1::2]
            box = sanitize(min(xs), min(ys), max(xs), max(ys), classes.index(name), *wh,
                           where=f"{lbl}:{n}", difficult=difficult)
            if box is not None:
                boxes.append(box)
        records.append(ImageRecord(img, wh[0], wh[1], boxes))
    checker.finish()
    return DetectionSet(src.name, classes, records, warnings)
