"""``predict``: run a checkpoint on images, draw the boxes, write COCO-style detections JSON.

Images are scaled by the data set's ``rescale`` (stored in the checkpoint)
so objects appear at the size the detector was trained on: a model trained
on 2560 px scenes halved to 1280 px sees a new 2560 px scene at 1280 px.
Sliced inference for huge scenes is a later feature.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")

from ultralytics.data.augment import LetterBox  # noqa: E402
from ultralytics.utils.nms import non_max_suppression  # noqa: E402
from ultralytics.utils.ops import scale_boxes  # noqa: E402

from rsdet_compress.data.record import IMAGE_SUFFIXES, list_images  # noqa: E402
from rsdet_compress.detectors.registry import load_detector  # noqa: E402
from rsdet_compress.errors import UserError  # noqa: E402

#: largest inference side when sizing from the image (a 10k scene needs slicing, not one pass).
MAX_SIDE = 4096


def _sources(source: Path) -> list[Path]:
    if source.is_dir():
        files = list_images(source)
        if not files:
            raise UserError(f"{source}: no images found")
        return files
    if not source.is_file():
        raise UserError(f"{source}: no such file or folder")
    if source.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{source}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
    return [source]


def inference_size(h: int, w: int, rescale: float, stride: int = 32) -> int:
    """Square letterbox side for an ``h`` x ``w`` image at data-set scale ``rescale``."""
    side = max(h, w) * rescale
    return int(min(MAX_SIDE, max(stride, math.ceil(side / stride) * stride)))


def draw(image: np.ndarray, dets: np.ndarray, names: list[str]) -> np.ndarray:
    """Boxes with class name and score, drawn on a copy of a BGR image."""
    out = image.copy()
    thick = max(1, round(max(out.shape[:2]) / 800))
    for x1, y1, x2, y2, score, cls in dets:
        color = tuple(int(c) for c in np.random.default_rng(int(cls) + 7).integers(64, 256, 3))
        p1, p2 = (int(x1), int(y1)), (int(x2), int(y2))
        cv2.rectangle(out, p1, p2, color, thick)
        cv2.putText(out, f"{names[int(cls)]} {score:.2f}", (p1[0], max(0, p1[1] - 3)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, color, thick)
    return out


@torch.inference_mode()
def detect(model: torch.nn.Module, image: np.ndarray, imgsz: int, conf: float = 0.25,
           iou: float = 0.7, max_det: int = 1000) -> np.ndarray:
    """Detections (N x 6: x1 y1 x2 y2 score cls) of one BGR image in its own pixel coordinates."""
    lb = LetterBox(new_shape=(imgsz, imgsz), auto=False)
    chip = lb(image=image)
    p = next(model.parameters())
    x = torch.from_numpy(np.ascontiguousarray(chip[..., ::-1].transpose(2, 0, 1))).to(p.device)
    x = x[None].to(p.dtype) / 255.0
    out = model(x)
    det = non_max_suppression(out[0] if isinstance(out, (tuple, list)) else out, conf, iou, max_det=max_det)[0]
    det[:, :4] = scale_boxes(x.shape[2:], det[:, :4], image.shape[:2])
    return det.cpu().numpy()


def predict(weights: str | Path, source: str | Path, out: str | Path, imgsz: int | None = None,
            conf: float = 0.25, iou: float = 0.7, device: str = "cpu") -> dict:
    """Detect objects in an image or a folder; write drawn images and ``detections.json`` to ``out``.

    The output folder is assembled in a temporary sibling and moved in place
    at the end, so an interrupted run leaves no partial results behind.
    Returns the COCO-style detections dict.
    """
    model, meta = load_detector(weights)
    model.to(device).eval()
    names = meta.get("names") or [str(i) for i in range(meta["num_classes"])]
    rescale = float(meta.get("rescale") or 1.0)
    files = _sources(Path(source))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
            "info": {"weights": str(weights), "conf": conf, "iou": iou}}
    try:
        for image_id, f in enumerate(files, start=1):
            image = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if image is None:
                raise UserError(f"{f}: unreadable image")
            h, w = image.shape[:2]
            size = imgsz or inference_size(h, w, rescale)
            dets = detect(model, image, size, conf, iou)
            coco["images"].append({"id": image_id, "file_name": f.name, "path": str(f),
                                   "width": w, "height": h, "inference_size": size})
            for x1, y1, x2, y2, score, cls in dets.tolist():
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": int(cls) + 1,
                    "category": names[int(cls)], "bbox": [round(x1, 1), round(y1, 1), round(x2 - x1, 1),
                                                           round(y2 - y1, 1)], "score": round(score, 4)})
            ext = ".jpg" if f.suffix.lower() in (".jpg", ".jpeg") else ".png"
            cv2.imwrite(str(tmp / f"{f.stem}{ext}"), draw(image, dets, names))
        (tmp / "detections.json").write_text(json.dumps(coco, indent=1))
        out.mkdir(exist_ok=True)
        for p in sorted(tmp.iterdir(), key=lambda p: p.name == "detections.json"):  # JSON last
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return coco
