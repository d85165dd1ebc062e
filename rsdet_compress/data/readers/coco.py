"""COCO JSON: one annotation file with images, categories and xywh boxes."""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from rsdet_compress.data.readers import register_reader
from rsdet_compress.data.record import BoxSanitizer, DetectionSet, ImageChecker, ImageRecord, check_declared_size
from rsdet_compress.errors import UserError
from rsdet_compress.textio import read_text


def _find_json(src: Path) -> Path:
    if src.is_file():
        return src
    cands = sorted(src.glob("*.json")) + sorted((src / "annotations").glob("*.json"))
    if len(cands) != 1:
        raise UserError(f"{src}: expected exactly one COCO .json (found {len(cands)}); "
                        "pass the JSON file itself as --src")
    return cands[0]


def _is_id(v: object) -> bool:
    """COCO ids are integers (some tools write strings); a list, float or bool is a broken file."""
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _safe_relative(fname: str) -> bool:
    """True if ``fname`` stays inside the folder it is resolved against (no absolute path, no ``..``)."""
    parts = re.split(r"[\\/]", fname)
    return not (fname.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", fname) or ".." in parts)


def _check_structure(path: Path, data: object) -> None:
    """Types of every field the reader uses, so a broken file is one line instead of a TypeError."""
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a COCO object with images/annotations/categories, "
                        f"got a JSON {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{path}: field '{key}' missing or not a list")
    for key, need in (("categories", ("id", "name")), ("images", ("id", "file_name"))):
        seen: set = set()
        for k, item in enumerate(data[key]):
            if not isinstance(item, dict) or any(n not in item for n in need):
                raise UserError(f"{path}: {key}[{k}] needs fields {', '.join(need)}")
            if not _is_id(item["id"]):
                raise UserError(f"{path}: {key}[{k}] id {item['id']!r} is not an integer")
            if item["id"] in seen:
                raise UserError(f"{path}: {key}[{k}] id {item['id']!r} is used twice")
            seen.add(item["id"])
    files: dict = {}
    for im in data["images"]:
        fname = im["file_name"]
        if not isinstance(fname, str) or not fname:
            raise UserError(f"{path}: image id {im['id']}: file_name must be a non-empty string")
        if not _safe_relative(fname):
            raise UserError(f"{path}: image id {im['id']}: file_name {fname!r} is absolute or climbs out "
                            "with '..'; file names must be relative to the JSON's folder")
        if fname in files:  # two entries, one file: its chips and boxes would be written twice
            raise UserError(f"{path}: image ids {files[fname]} and {im['id']} both name {fname!r}")
        files[fname] = im["id"]
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise UserError(f"{path}: annotations[{k}] is not an object")
        if not _is_id(a.get("image_id")):
            raise UserError(f"{path}: annotations[{k}] image_id {a.get('image_id')!r} is not an integer")


@register_reader("coco")
def read_coco(src: Path, classes: list[str] | None = None, max_bad_images: float = 0.05,
              **_: object) -> DetectionSet:
    """Read a COCO detection JSON; ``file_name`` is resolved against the JSON's folder,
    its parent, or an ``images/`` folder beside it."""
    path = _find_json(src)
    try:
        data = json.loads(read_text(path, "COCO JSON"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    _check_structure(path, data)
    cat_names = {c["id"]: str(c["name"]) for c in data["categories"]}
    classes = classes or [cat_names[i] for i in sorted(cat_names, key=lambda i: (isinstance(i, str), i))]
    anns = defaultdict(list)
    for k, a in enumerate(data["annotations"]):
        anns[a["image_id"]].append((k, a))
    warnings: Counter = Counter()
    unknown = set(anns) - {im["id"] for im in data["images"]}
    if unknown:  # boxes that belong to no image: lost, so counted rather than dropped silently
        warnings["annotation for unknown image id ignored"] += sum(len(anns[i]) for i in unknown)
    roots = [path.parent, path.parent.parent, path.parent / "images", path.parent.parent / "images"]
    sanitize, checker = BoxSanitizer(len(classes), warnings), ImageChecker(warnings, max_bad_images)
    records = []
    for im in data["images"]:
        fname = im["file_name"]
        img = next((r / fname for r in roots if (r / fname).is_file()), None)
        if img is None:
            raise UserError(f"{path}: image id {im['id']}: file {fname!r} not found beside the JSON")
        wh = checker.size(img)
        if wh is None:
            continue
        check_declared_size(f"{path}: image id {im['id']}", (im.get("width"), im.get("height")), wh, img)
        boxes = []
        for k, a in anns.get(im["id"], []):
            where = f"{path}: annotations[{k}]"
            bbox = a.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4
                    and all(isinstance(v, (int, float)) for v in bbox)):
                raise UserError(f"{where}: bbox must be 4 numbers [x, y, w, h]")
            cid = a.get("category_id")
            name = cat_names.get(cid) if _is_id(cid) else None
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
