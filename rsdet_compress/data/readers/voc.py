"""Pascal VOC XML (as DIOR and many aerial sets ship): Annotations/*.xml beside the images."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from rsdet_compress.data.readers import register_reader
from rsdet_compress.data.record import (
    BoxSanitizer,
    DetectionSet,
    ImageChecker,
    ImageRecord,
    check_declared_size,
    list_images,
)
from rsdet_compress.errors import UserError


def parse_voc_xml(path: Path) -> tuple[str, list[tuple[str, list[float], bool]], tuple[float, float]]:
    """(image file name, [(class, [xmin, ymin, xmax, ymax], difficult)], (width, height) as
    stated in <size>, 0 where absent) from one XML."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise UserError(f"{path}:{e.position[0]}: invalid XML ({e})") from None
    fname = (root.findtext("filename") or "").strip()
    if not fname:
        raise UserError(f"{path}: missing <filename>")
    objs = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if not name or bb is None:
            raise UserError(f"{path}: object #{k + 1} lacks <name> or <bndbox>")
        try:
            coords = [float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise UserError(f"{path}: object #{k + 1} ({name}) has a missing or non-numeric bndbox") from None
        objs.append((name, coords, (obj.findtext("difficult") or "0").strip() == "1"))
    size = []
    for tag in ("width", "height"):
        try:
            size.append(float(root.findtext(f"size/{tag}") or 0))
        except ValueError:
            raise UserError(f"{path}: <size><{tag}> is not a number") from None
    return fname, objs, (size[0], size[1])


@register_reader("voc")
def read_voc(src: Path, classes: list[str] | None = None, max_bad_images: float = 0.05,
             **_: object) -> DetectionSet:
    """Read ``src/Annotations/*.xml``; images are found by <filename> anywhere under ``src``
    (JPEGImages/, JPEGImages-trainval/ ...). The difficult flag is kept."""
    ann_dir = src / "Annotations"
    xmls = sorted(ann_dir.glob("*.xml")) if ann_dir.is_dir() else []
    if not xmls:
        raise UserError(f"{src}: VOC layout needs Annotations/*.xml")
    parsed = [(x, *parse_voc_xml(x)) for x in xmls]
    classes = classes or sorted({o[0] for _, _, objs, _ in parsed for o in objs})
    index = {p.name: p for p in list_images(src)}
    stems = {p.stem: p for p in index.values()}
    warnings: Counter = Counter()
    sanitize, checker = BoxSanitizer(len(classes), warnings), ImageChecker(warnings, max_bad_images)
    records = []
    for xml, fname, objs, declared in parsed:
        img = index.get(fname) or stems.get(Path(fname).stem) or stems.get(xml.stem)
        if img is None:
            raise UserError(f"{xml}: image {fname!r} not found under {src}")
        wh = checker.size(img)
        if wh is None:
            continue
        check_declared_size(f"{xml}: <size>", declared, wh, img)
        boxes = []
        for k, (name, c, difficult) in enumerate(objs):
            if name not in classes:
                raise UserError(f"{xml}: object #{k + 1} class {name!r} not in the class list")
            box = sanitize(*c, classes.index(name), *wh, where=f"{xml}: object #{k + 1}", difficult=difficult)
            if box is not None:
                boxes.append(box)
        records.append(ImageRecord(img, wh[0], wh[1], boxes))
    checker.finish()
    return DetectionSet(src.name, classes, records, warnings)
