"""COCO ground truth of an ultralytics-layout split, derived from its YOLO labels on first use.

A data set as ultralytics users have it (a data YAML with ``path/train/val/test/names``,
images in one folder per split, labels found by ultralytics' rule: the last
``/images/`` of each image path replaced by ``/labels/``, suffix ``.txt``) has no
COCO JSON, which our mAP needs. It is written once per split and kept beside the
labels, where ultralytics keeps its ``labels/<split>.cache`` (in the runs folder
when the data set is read-only), with a fingerprint of every image and label
file: any label edited, added or removed rebuilds it.

The rows are checked as ``data prepare`` checks them (five fields, normalised
coordinates, class ids in range, boxes clipped to the image or dropped and
counted); an image without a label file is background, as in ultralytics.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

from rsdet_compress.atomic import write_json
from rsdet_compress.data.readers.yolo import parse_yolo_label
from rsdet_compress.data.record import BoxSanitizer, ImageChecker, list_images
from rsdet_compress.errors import UserError
from rsdet_compress.settings import runs_root

log = logging.getLogger(__name__)

#: bumped when the derived JSON changes meaning, so old caches are rebuilt
VERSION = 1


def label_path(image: Path) -> Path:
    """Where ultralytics looks for ``image``'s labels (``img2label_paths``)."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    text = str(image)
    return Path(sb.join(text.rsplit(sa, 1)) if sa in text else text).with_suffix(".txt")


def fingerprint(images: list[Path]) -> str:
    """Hash of every image's and label's path, size and modification time (ultralytics' cache rule)."""
    h = hashlib.sha256(f"v{VERSION}".encode())
    for img in images:
        for p in (img, label_path(img)):
            try:
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}\0-\n".encode())
    return h.hexdigest()


def cache_path(images_dir: Path, split: str) -> Path:
    """``labels/<split>.coco.json`` beside the labels if that folder is writable, else under the runs folder."""
    labels = label_path(images_dir / "x.jpg").parent
    if labels.is_dir() and os.access(labels.parent, os.W_OK):
        return labels.parent / f"{labels.name}.coco.json"
    key = hashlib.sha1(str(images_dir.resolve()).encode()).hexdigest()[:16]
    return runs_root() / "cache" / "coco" / f"{split}-{key}.json"


def derive_coco(images_dir: Path, names: list[str], split: str, where: str) -> Path:
    """The COCO JSON of the split in ``images_dir`` (cached, rebuilt when any image or label changed)."""
    images = list_images(images_dir)
    if not images:
        raise UserError(f"{where}: split '{split}' folder {images_dir} has no images")
    out = cache_path(images_dir, split)
    fp = fingerprint(images)
    if out.is_file():
        try:
            info = json.loads(out.read_text()).get("info", {})
        except (OSError, ValueError):
            info = {}
        if info.get("rsdet_fingerprint") == fp and info.get("names") == names:
            return out
    coco = build_coco(images, images_dir, names)
    coco["info"] = {"description": f"derived from the YOLO labels of {images_dir}", "rsdet_fingerprint": fp,
                    "names": names, "version": VERSION}
    write_json(out, coco, indent=None)
    return out


def build_coco(images: list[Path], images_dir: Path, names: list[str]) -> dict:
    """COCO ground truth (category ids 1..n, boxes in pixels) from the YOLO labels of ``images``."""
    warnings: Counter = Counter()
    sanitize, checker = BoxSanitizer(len(names), warnings), ImageChecker(warnings)
    labelled = 0
    coco: dict = {"images": [], "annotations": [],
                  "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    for img in images:
        wh = checker.size(img)
        if wh is None:
            continue
        lbl = label_path(img)
        if lbl.is_file():
            labelled += 1
            boxes = parse_yolo_label(lbl, *wh, sanitize)
        else:
            warnings["image without label file (background)"] += 1
            boxes = []
        image_id = len(coco["images"]) + 1
        coco["images"].append({"id": image_id, "file_name": img.relative_to(images_dir).as_posix(),
                               "width": wh[0], "height": wh[1]})
        for b in boxes:
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": b.cls + 1,
                "bbox": [round(b.x1, 2), round(b.y1, 2), round(b.width, 2), round(b.height, 2)],
                "area": round(b.area, 2), "iscrowd": 0})
    checker.finish()
    if not labelled:
        raise UserError(f"{images_dir}: no label file found for any image (looked in "
                        f"{label_path(images[0]).parent}, ultralytics' images/ -> labels/ rule)")
    if warnings:
        log.warning("%s: %s", images_dir, ", ".join(f"{n} {w}" for w, n in sorted(warnings.items())))
    return coco
