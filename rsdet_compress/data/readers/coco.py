"""COCO JSON: one annotation file with images, categories and xywh boxes."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from rsdet_compress.data.readers import register_reader
from rsdet_compress.data.record import BoxSanitizer, DetectionSet, ImageChecker, ImageRecord
from rsdet_compress.errors import UserError


def _find_json(src: Path) -> Path:
    if src.is_file():
        return src
    cands = sorted(src.glob("*.json")) + sorted((src / "annotations").glob("*.json"))
    if len(cands) != 1:
        raise UserError(f"{src}: expected exactly one COCO .json (found {len(cands)}); "
                        "pass the JSON file itself as --src")
    return cands[0]


@register_reader("coco")
def read_coco(src: Path, classes: list[str] | None = None, max_bad_images: float = 0.05,
              **_: object) -> DetectionSet:
    """Read a COCO detection JSON; ``file_name`` is resolved against the JSON's folder,
    its parent, or an ``images/`` folder beside it."""
    path = _find_json(src)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a COCO object with images/annotations/categories, "
                        f"got a JSON {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{path}: field '{key}' missing or not a list")
    for key, need in (("categories", ("id", "name")), ("images", ("id", "file_name"))):
        for k, item in enumerate(data[key]):
            if not isinstance(item, dict) or any(n not in item for n in need):
                raise UserError(f"{path}: {key}[{k}] needs fields {', '.join(need)}")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_names = {c["id"]: str(c["name"]) for c in cats}
    classes = classes or [cat_names[i] for i in sorted(cat_names)]
    anns = defaultdict(list)
    for k, a in enumerate(data["annotations"]):
        anns[a.get("image_id")].append((k, a))
    roots = [path.parent, path.parent.parent, path.parent / "images", path.parent.parent / "images"]
    warnings: Counter = Counter()
    sanitize, checker = BoxSanitizer(len(classes), warnings), ImageChecker(warnings, max_bad_images)
    records = []
    for im in data["images"]:
        fname = im.get("file_name")
        if not fname:
            raise UserError(f"{path}: image id {im.get('id')} has no file_name")
        img = next((r / fname for r in roots if (r / fname).is_file()), None)
        if img is None:
            raise UserError(f"{path}: image file {fname!r} not found beside the JSON")
        wh = checker.size(img)
        if wh is None:
            continue
        boxes = []
        for k, a in anns.get(im["id"], []):
            where = f"{path}: annotations[{k}]"
            bbox = a.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4
                    and all(isinstance(v, (int, float)) for v in bbox)):
                raise UserError(f"{where}: bbox must be 4 numbers [x, y, w, h]")
            name = cat_names.get(a.get("category_id"))
            if name is None:
                raise UserError(f"{where}: category_id {a.get('category_id')} not in categories")
            if name not in classes:
                raise UserError(f"{where}: class {name!r} not in the class list")
            x, y, w, h = bbox
            box = sanitize(x, y, x + w, y + h, classes.index(name), *wh, where=where,
                           difficult=bool(a.get("iscrowd", 0)))
            if box is not None:
                boxes.append(box)
        records.append(ImageRecord(img, wh[0], wh[1], boxes))
    checker.finish()
    return DetectionSet(path.stem, classes, records, warnings)
