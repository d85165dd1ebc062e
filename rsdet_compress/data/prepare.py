"""``data prepare``: raw data set -> tiled YOLO layout + dataset YAML + COCO ground truth per split.

The output folder is assembled by :func:`rsdet_compress.atomic.staged_dir`: in a
hidden ``.partial`` sibling under an exclusive lock, swapped in only when
complete, and never allowed to be, contain or lie inside the source data set
(``--out X --src X --overwrite`` once deleted the raw data).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from rsdet_compress.atomic import staged_dir
from rsdet_compress.data.imageio import CorruptImage
from rsdet_compress.data.imageio import read_image as _read_image  # module attribute: tests inject failures
from rsdet_compress.data.readers import read_class_file, read_dataset
from rsdet_compress.data.record import Box, DetectionSet, ImageRecord
from rsdet_compress.data.split import SPLITS, split_sources
from rsdet_compress.data.summary import PrepareSummary
from rsdet_compress.data.tiling import boxes_in_tile, check_tile_count, scale_box, tile_grid
from rsdet_compress.errors import UserError
from rsdet_compress.settings import resolve_data_path

#: values of ``missing_labels``: refuse an image without a label file, or take it as box-free.
MISSING_LABELS = ("error", "empty")


@dataclass
class PrepareConfig:
    """How to turn a raw data set into training chips. Defaults suit ~0.5 m/px satellite scenes."""

    #: raw data set format (the reader that parses it).
    format: str
    #: raw data set folder (absolute, or relative to $RSDET_DATA).
    src: str
    #: output folder (must not exist unless --overwrite).
    out: str
    #: chip side in pixels after rescaling; 640 is ultralytics' native training size.
    tile: int = 640
    #: fraction of a tile shared with its neighbour, 0..<1, so objects cut by one border are whole in the next.
    overlap: float = 0.2
    #: image scale applied before tiling (0.5 halves resolution: fewer, cheaper chips for big objects).
    rescale: float = 1.0
    #: a box keeps its label in a tile only if at least this fraction of it is visible there.
    min_visibility: float = 0.5
    #: train,val,test fractions of SOURCE images, summing to 1, train > 0, e.g. 0.8,0.1,0.1 (tiles of one image
    #: never straddle splits).
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    #: seed of the split and of the empty-tile sampling; same seed, same output.
    seed: int = 0
    #: fraction of box-free train tiles kept as negatives (val/test always keep all, for honest mAP).
    keep_empty: float = 0.1
    #: fixed class order (file with one name per line); None = the reader's order.
    classes: str | None = None
    #: how to treat an image without a label file: "error" (default) or "empty".
    missing_labels: str = "error"
    #: fraction of unreadable images tolerated (skipped and counted) before it becomes an error.
    max_bad_images: float = 0.05
    #: JPEG quality of written chips (PNG sources stay PNG, losslessly).
    jpeg_quality: int = 95
    #: replace an existing --out instead of refusing (never one that is, contains or lies inside --src).
    overwrite: bool = False
    reader_options: dict = field(default_factory=dict)

    def check(self) -> None:
        """Reject nonsensical settings with a one-line message naming the option."""
        if self.tile < 32:
            raise UserError(f"--tile must be at least 32 pixels, got {self.tile}")
        if not 0.0 <= self.overlap < 1.0:
            raise UserError(f"--overlap must be in [0, 1), got {self.overlap}")
        if not 0.0 < self.rescale <= 4.0:
            raise UserError(f"--rescale must be in (0, 4], got {self.rescale}")
        if not 0.0 < self.min_visibility <= 1.0:
            raise UserError(f"--min-visibility must be in (0, 1], got {self.min_visibility}")
        split = tuple(self.split) if isinstance(self.split, (list, tuple)) else (self.split,)
        if (len(split) != 3 or not all(isinstance(f, (int, float)) and math.isfinite(f) and f >= 0 for f in split)
                or abs(sum(split) - 1) > 1e-6):
            raise UserError(f"--split must be three finite fractions >= 0 summing to 1 (train,val,test), "
                            f"got {self.split}")
        if split[0] <= 0:
            raise UserError(f"--split gives train {split[0]}: the training split must get source images")
        if not 0.0 <= self.keep_empty <= 1.0:
            raise UserError(f"--keep-empty must be in [0, 1], got {self.keep_empty}")
        if self.missing_labels not in MISSING_LABELS:
            raise UserError(f"--missing-labels must be 'error' or 'empty', got {self.missing_labels!r}")
        if not 0.0 <= self.max_bad_images <= 1.0:
            raise UserError(f"max_bad_images must be in [0, 1], got {self.max_bad_images}")
        if not 1 <= self.jpeg_quality <= 100:
            raise UserError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


def _yolo_lines(boxes: list[Box], w: int, h: int) -> str:
    return "".join(f"{b.cls} {(b.x1 + b.x2) / 2 / w:.6f} {(b.y1 + b.y2) / 2 / h:.6f} "
                   f"{b.width / w:.6f} {b.height / h:.6f}\n" for b in boxes)


class _SplitWriter:
    """Accumulates one split's chips, YOLO labels and COCO ground truth."""

    def __init__(self, root: Path, split: str, classes: list[str]):
        self.images_dir = root / "images" / split
        self.labels_dir = root / "labels" / split
        self.images_dir.mkdir(parents=True)
        self.labels_dir.mkdir(parents=True)
        self.names: set[str] = set()
        self.coco = {"images": [], "annotations": [],
                     "categories": [{"id": i + 1, "name": n} for i, n in enumerate(classes)]}

    def add(self, name: str, chip: np.ndarray, boxes: list[Box], source: str, x0: int, y0: int,
            scale: float, quality: int) -> None:
        if name in self.names:  # would overwrite a chip while its boxes stay in the COCO JSON twice
            raise RuntimeError(f"chip name {name} used twice (source names must be unique)")
        self.names.add(name)
        h, w = chip.shape[:2]
        params = [cv2.IMWRITE_JPEG_QUALITY, quality] if name.endswith(".jpg") else []
        if not cv2.imwrite(str(self.images_dir / name), chip, params):
            raise UserError(f"{self.images_dir / name}: could not write image (disk full?)")
        (self.labels_dir / Path(name).with_suffix(".txt")).write_text(_yolo_lines(boxes, w, h))
        image_id = len(self.coco["images"]) + 1
        self.coco["images"].append({"id": image_id, "file_name": name, "width": w, "height": h,
                                    "source_image": source, "tile_x": x0, "tile_y": y0, "scale": scale})
        for b in boxes:
            self.coco["annotations"].append({
                "id": len(self.coco["annotations"]) + 1, "image_id": image_id, "category_id": b.cls + 1,
                "bbox": [round(b.x1, 2), round(b.y1, 2), round(b.width, 2), round(b.height, 2)],
                "area": round(b.area, 2), "iscrowd": int(b.difficult)})


def source_names(records: list[ImageRecord]) -> list[str]:
    """A unique chip-name stem per source image: the file stem, as before, unless stems collide.

    Images with the same stem in different folders (``a/x.png``, ``b/x.png``) or
    with different suffixes once overwrote each other's chips while both kept
    their boxes in the COCO JSON. Colliding ones get their path relative to the
    folder they share (``a__x``, ``b__x``); a name still taken gets a short hash
    of the full path. Data sets without collisions keep their chip names.
    """
    paths = [r.path for r in records]
    stems = Counter(p.stem for p in paths)
    clash = [p for p in paths if stems[p.stem] > 1]
    root = Path(os.path.commonpath(clash)) if clash else None
    if root is not None and root in clash:  # the same file listed twice (commonpath is the file)
        root = root.parent

    in_folder = Counter((p.parent, p.stem) for p in clash)  # x.jpg beside x.png: keep the suffix too

    def relative(p: Path) -> str:
        rel = p.relative_to(root)
        last = rel.stem if in_folder[(p.parent, p.stem)] == 1 else rel.name.replace(".", "_")
        return "__".join((*rel.parent.parts, last)).replace(" ", "_")

    names = [p.stem if stems[p.stem] == 1 else relative(p) for p in paths]
    taken = Counter(names)
    return [n if taken[n] == 1 else f"{n}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"
            for n, p in zip(names, paths)]


def _chip_name(record: ImageRecord, source: str, x0: int, y0: int) -> str:
    ext = ".jpg" if record.path.suffix.lower() in (".jpg", ".jpeg") else ".png"
    return f"{source}_{x0}_{y0}{ext}"


def _write_yaml(root: Path, ds: DetectionSet, cfg: PrepareConfig, src: Path) -> None:
    data = {
        "names": dict(enumerate(ds.classes)),
        "nc": len(ds.classes),
        "train": "images/train", "val": "images/val", "test": "images/test",
        # Our own keys (ultralytics ignores them): COCO ground truth and how the chips were made.
        "coco": {s: f"annotations/{s}.json" for s in SPLITS},
        "rsdet": {"format": cfg.format, "source": str(src.resolve()), "tile": cfg.tile,
                  "overlap": cfg.overlap, "rescale": cfg.rescale, "min_visibility": cfg.min_visibility,
                  "split": list(cfg.split), "seed": cfg.seed, "keep_empty": cfg.keep_empty},
    }
    text = "# Written by `rsdet-compress data prepare`; paths are relative to this file.\n"
    (root / "data.yaml").write_text(text + yaml.safe_dump(data, sort_keys=False))


def _scaled(rec: ImageRecord, rescale: float) -> tuple[int, int]:
    return max(1, round(rec.width * rescale)), max(1, round(rec.height * rescale))


def _read(cfg: PrepareConfig, src: Path, out: Path) -> DetectionSet:
    """The data set, read and checked before any chip is cut."""
    classes = read_class_file(Path(cfg.classes)) if cfg.classes else None
    options = dict(cfg.reader_options)
    if cfg.format in ("yolo", "dota"):
        options["missing_labels"] = cfg.missing_labels
    try:
        ds = read_dataset(cfg.format, src, classes=classes, max_bad_images=cfg.max_bad_images, **options)
    except OSError as e:  # inside staged_dir an OSError would read as a failure to write --out
        raise UserError(f"{e.filename or src}: cannot read ({e.strerror or e})") from None
    # Images may live outside --src (COCO resolves file names against the JSON's parent too).
    target = out.resolve()
    for folder in sorted({r.path.parent.resolve() for r in ds.images}):
        if target == folder or folder.is_relative_to(target) or target.is_relative_to(folder):
            raise UserError(f"{out}: output would overwrite or lie inside the image folder {folder}; "
                            "choose an --out outside it")
    for rec in ds.images:  # unbounded work is refused before any pixel is decoded
        check_tile_count(*_scaled(rec, cfg.rescale), cfg.tile, cfg.overlap, image=rec.path)
    return ds


def _check_split_sizes(assignment: dict[str, str], cfg: PrepareConfig, src: Path,
                       warnings: Counter) -> None:
    """A split the user gave a fraction must get source images; one given 0 is empty on purpose."""
    counts, n = Counter(assignment.values()), len(assignment)
    for s, f in zip(SPLITS, cfg.split):
        if f == 0:
            warnings[f"split '{s}' empty (--split gives it 0)"] += 1
        elif counts[s] == 0:
            raise UserError(f"--split {','.join(f'{v:g}' for v in cfg.split)}: split '{s}' gets none of the "
                            f"{n} source image(s) of {src} (tiles of one image never straddle splits); "
                            f"add images or give '{s}' the fraction 0")


def _check_result(summary: PrepareSummary, ds: DetectionSet, cfg: PrepareConfig, src: Path) -> None:
    """Refuse an output that would train or score on nothing."""
    if not sum(sum(c.values()) for c in summary.boxes.values()):
        read = sum(len(r.boxes) for r in ds.images)
        why = "; ".join(f"{n} x {k}" for k, n in summary.warnings.most_common(3))
        raise UserError(f"{src}: no box reached any chip ({read} boxes read"
                        + (f"; {why}" if why else "") + "): nothing to train on")
    for s, f in zip(SPLITS, cfg.split):
        if f > 0 and not summary.tiles[s]:
            why = (f"; {summary.warnings['corrupt image skipped']} corrupt image(s) skipped"
                   if summary.warnings["corrupt image skipped"] else "")
            if s == "train":
                why += f"; chips without boxes are kept only at --keep-empty {cfg.keep_empty}"
            raise UserError(f"split '{s}': no chips written from its {summary.sources[s]} source image(s){why}")


def prepare(cfg: PrepareConfig, progress: bool = True) -> PrepareSummary:
    """Read ``cfg.src`` in ``cfg.format``, split by source image, tile, and write ``cfg.out``.

    Returns the summary (also written to ``out/summary.json``).
    """
    cfg.check()
    src, out = resolve_data_path(cfg.src), Path(cfg.out)
    protect = (src, *([cfg.classes] if cfg.classes else []))
    with staged_dir(out, cfg.overwrite, protect=protect) as tmp:
        ds = _read(cfg, src, out)
        names = source_names(ds.images)
        assignment = split_sources(names, tuple(cfg.split), cfg.seed)
        summary = PrepareSummary(ds.name, ds.classes, warnings=Counter(ds.warnings))
        _check_split_sizes(assignment, cfg, src, summary.warnings)
        seen = len(ds.images) + ds.warnings["corrupt image skipped"]
        writers = {s: _SplitWriter(tmp, s, ds.classes) for s in SPLITS}
        rng = random.Random(cfg.seed)
        items = list(zip(ds.images, names))
        if progress:
            from tqdm import tqdm
            items = tqdm(items, desc="tiling", unit="img")
        for rec, name in items:
            split = assignment[name]
            try:
                img = _read_image(rec.path)
            except CorruptImage as e:  # the reader's max_bad_images budget covers this one too
                summary.warnings["corrupt image skipped"] += 1
                bad = summary.warnings["corrupt image skipped"]
                if bad > cfg.max_bad_images * seen:
                    raise UserError(f"{e} ({bad} of {seen} images bad)") from None
                continue
            if (img.shape[1], img.shape[0]) != (rec.width, rec.height):
                raise UserError(f"{rec.path}: decoded as {img.shape[1]}x{img.shape[0]}, read as "
                                f"{rec.width}x{rec.height} (did the file change during prepare?)")
            if cfg.rescale != 1.0:
                interp = cv2.INTER_AREA if cfg.rescale < 1 else cv2.INTER_LINEAR
                img = cv2.resize(img, _scaled(rec, cfg.rescale), interpolation=interp)
            boxes = [scale_box(b, cfg.rescale) for b in rec.boxes]
            summary.add_source(split)
            for t in tile_grid(img.shape[1], img.shape[0], cfg.tile, cfg.overlap):
                kept = boxes_in_tile(boxes, t, cfg.min_visibility, summary.warnings)
                if not kept and split == "train" and rng.random() >= cfg.keep_empty:
                    summary.empty_skipped += 1
                    continue
                chip = img[t.y0:t.y0 + t.h, t.x0:t.x0 + t.w]
                writers[split].add(_chip_name(rec, name, t.x0, t.y0), chip, kept, name,
                                   t.x0, t.y0, cfg.rescale, cfg.jpeg_quality)
                summary.add_tile(split, kept)
        _check_result(summary, ds, cfg, src)
        (tmp / "annotations").mkdir()
        for s, w in writers.items():
            (tmp / "annotations" / f"{s}.json").write_text(json.dumps(w.coco))
        _write_yaml(tmp, ds, cfg, src)
        config = {k: v for k, v in asdict(cfg).items() if k != "overwrite"}
        (tmp / "summary.json").write_text(json.dumps({"config": config, **summary.to_dict()}, indent=2))
    return summary
