"""``data prepare``: raw data set -> tiled YOLO layout + dataset YAML + COCO ground truth per split.

The output folder is built in a temporary sibling and renamed at the end, so
an interrupted or failed run never leaves a folder that looks complete.
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from rsdet_compress.data.readers import read_class_file, read_dataset
from rsdet_compress.data.record import Box, DetectionSet, ImageRecord
from rsdet_compress.data.split import SPLITS, split_sources
from rsdet_compress.data.summary import PrepareSummary
from rsdet_compress.data.tiling import boxes_in_tile, scale_box, tile_grid
from rsdet_compress.errors import UserError
from rsdet_compress.settings import resolve_data_path


@dataclass
class PrepareConfig:
    """How to turn a raw data set into training chips. Defaults suit ~0.5 m/px satellite scenes."""

    format: str
    src: str
    out: str
    #: chip side in pixels after rescaling; 640 is ultralytics' native training size.
    tile: int = 640
    #: fraction of a tile shared with its neighbour, so objects cut by one border are whole in the next.
    overlap: float = 0.2
    #: image scale applied before tiling (0.5 halves resolution: fewer, cheaper chips for big objects).
    rescale: float = 1.0
    #: a box keeps its label in a tile only if at least this fraction of it is visible there.
    min_visibility: float = 0.5
    #: train/val/test fractions of SOURCE images (tiles of one image never straddle splits).
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    #: seed of the split and of the empty-tile sampling; same seed, same output.
    seed: int = 0
    #: fraction of box-free train tiles kept as negatives (val/test always keep all, for honest mAP).
    keep_empty: float = 0.1
    #: fixed class order (file with one name per line); None = the reader's order.
    classes: str | None = None
    #: "error" (default) or "empty": how to treat an image without a label file.
    missing_labels: str = "error"
    #: fraction of unreadable images tolerated (skipped and counted) before it becomes an error.
    max_bad_images: float = 0.05
    #: JPEG quality of written chips (PNG sources stay PNG, losslessly).
    jpeg_quality: int = 95
    #: replace an existing output folder instead of refusing.
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
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise UserError(f"--split must be three fractions summing to 1, got {self.split}")
        if not 0.0 <= self.keep_empty <= 1.0:
            raise UserError(f"--keep-empty must be in [0, 1], got {self.keep_empty}")
        if self.missing_labels not in ("error", "empty"):
            raise UserError(f"--missing-labels must be 'error' or 'empty', got {self.missing_labels!r}")


def _read_image(path: Path) -> np.ndarray:
    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        raise UserError(f"{path}: unreadable image")
    return im


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
        self.coco = {"images": [], "annotations": [],
                     "categories": [{"id": i + 1, "name": n} for i, n in enumerate(classes)]}

    def add(self, name: str, chip: np.ndarray, boxes: list[Box], source: str, x0: int, y0: int,
            scale: float, quality: int) -> None:
        h, w = chip.shape[:2]
        params = [cv2.IMWRITE_JPEG_QUALITY, quality] if name.endswith(".jpg") else []
        if not cv2.imwrite(str(self.images_dir / name), chip, params):
            raise UserError(f"{self.images_dir / name}: could not write image")
        (self.labels_dir / Path(name).with_suffix(".txt")).write_text(_yolo_lines(boxes, w, h))
        image_id = len(self.coco["images"]) + 1
        self.coco["images"].append({"id": image_id, "file_name": name, "width": w, "height": h,
                                    "source_image": source, "tile_x": x0, "tile_y": y0, "scale": scale})
        for b in boxes:
            self.coco["annotations"].append({
                "id": len(self.coco["annotations"]) + 1, "image_id": image_id, "category_id": b.cls + 1,
                "bbox": [round(b.x1, 2), round(b.y1, 2), round(b.width, 2), round(b.height, 2)],
                "area": round(b.area, 2), "iscrowd": int(b.difficult)})


def _chip_name(record: ImageRecord, x0: int, y0: int) -> str:
    ext = ".jpg" if record.path.suffix.lower() in (".jpg", ".jpeg") else ".png"
    return f"{record.source_id}_{x0}_{y0}{ext}"


def _write_yaml(root: Path, ds: DetectionSet, cfg: PrepareConfig) -> None:
    data = {
        "names": dict(enumerate(ds.classes)),
        "nc": len(ds.classes),
        "train": "images/train", "val": "images/val", "test": "images/test",
        # Our own keys (ultralytics ignores them): COCO ground truth and how the chips were made.
        "coco": {s: f"annotations/{s}.json" for s in SPLITS},
        "rsdet": {"format": cfg.format, "source": str(Path(cfg.src).resolve()), "tile": cfg.tile,
                  "overlap": cfg.overlap, "rescale": cfg.rescale, "min_visibility": cfg.min_visibility,
                  "split": list(cfg.split), "seed": cfg.seed, "keep_empty": cfg.keep_empty},
    }
    text = "# Written by `rsdet-compress data prepare`; paths are relative to this file.\n"
    (root / "data.yaml").write_text(text + yaml.safe_dump(data, sort_keys=False))


def prepare(cfg: PrepareConfig, progress: bool = True) -> PrepareSummary:
    """Read ``cfg.src`` in ``cfg.format``, split by source image, tile, and write ``cfg.out``.

    Returns the summary (also written to ``out/summary.json``).
    """
    cfg.check()
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out}: output folder exists (use --overwrite to replace it)")
    classes = read_class_file(Path(cfg.classes)) if cfg.classes else None
    options = dict(cfg.reader_options)
    if cfg.format in ("yolo", "dota"):
        options["missing_labels"] = cfg.missing_labels
    ds = read_dataset(cfg.format, resolve_data_path(cfg.src), classes=classes,
                      max_bad_images=cfg.max_bad_images, **options)
    assignment = split_sources([r.source_id for r in ds.images], tuple(cfg.split), cfg.seed)
    summary = PrepareSummary(ds.name, ds.classes, warnings=Counter(ds.warnings))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        writers = {s: _SplitWriter(tmp, s, ds.classes) for s in SPLITS}
        rng = random.Random(cfg.seed)
        records = ds.images
        if progress:
            from tqdm import tqdm
            records = tqdm(records, desc="tiling", unit="img")
        for rec in records:
            split = assignment[rec.source_id]
            img = _read_image(rec.path)
            if cfg.rescale != 1.0:
                size = (max(1, round(rec.width * cfg.rescale)), max(1, round(rec.height * cfg.rescale)))
                interp = cv2.INTER_AREA if cfg.rescale < 1 else cv2.INTER_LINEAR
                img = cv2.resize(img, size, interpolation=interp)
            boxes = [scale_box(b, cfg.rescale) for b in rec.boxes]
            summary.add_source(split)
            for t in tile_grid(img.shape[1], img.shape[0], cfg.tile, cfg.overlap):
                kept = boxes_in_tile(boxes, t, cfg.min_visibility, summary.warnings)
                if not kept and split == "train" and rng.random() >= cfg.keep_empty:
                    summary.empty_skipped += 1
                    continue
                chip = img[t.y0:t.y0 + t.h, t.x0:t.x0 + t.w]
                writers[split].add(_chip_name(rec, t.x0, t.y0), chip, kept, rec.source_id,
                                   t.x0, t.y0, cfg.rescale, cfg.jpeg_quality)
                summary.add_tile(split, kept)
        (tmp / "annotations").mkdir()
        for s, w in writers.items():
            (tmp / "annotations" / f"{s}.json").write_text(json.dumps(w.coco))
        _write_yaml(tmp, ds, cfg)
        config = {k: v for k, v in asdict(cfg).items() if k != "overwrite"}
        (tmp / "summary.json").write_text(json.dumps({"config": config, **summary.to_dict()}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
