"""``predict``: run a detector on images or huge scenes; draw the boxes, write COCO-style JSON and GeoJSON.

Images are scaled by the data set's ``rescale`` (stored in the checkpoint) so
objects appear at the size the detector was trained on: a model trained on
2560 px scenes halved to 1280 px sees a new 2560 px scene at 1280 px.

Two modes, chosen per image:

* whole image, one pass (small images, or ``imgsz`` given);
* sliced (:mod:`rsdet_compress.engine.slicer`): when ``slice_size`` is given,
  when the rescaled image is more than :data:`SLICE_FACTOR` times the model's
  input, or when the image is too large to decode at once. Windows are read
  one batch at a time, so a 10k x 10k GeoTIFF needs a few tens of MB.

Outputs in ``out``: one drawn image per input (a downscaled JPEG preview for
scenes too large to decode at once), ``detections.json`` (COCO style, all
images) and ``<stem>.geojson`` for georeferenced inputs, in the raster's CRS
(TIFFs without georeferencing get pixel coordinates and a warning).
The weights may be any model :func:`rsdet_compress.runtime.loader.load_model`
loads (float, compressed, ONNX, int8 ONNX).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch

from rsdet_compress.atomic import staged_dir, write_json
from rsdet_compress.data.imageio import CorruptImage
from rsdet_compress.data.letterbox import letterbox
from rsdet_compress.data.record import IMAGE_SUFFIXES, list_images
from rsdet_compress.data.tiling import Tile
from rsdet_compress.engine.geo import georef_of, to_geojson, write_geojson
from rsdet_compress.engine.scorer import check_imgsz
from rsdet_compress.engine.slicer import SceneReader, SliceOptions, detect_chips, predict_sliced
from rsdet_compress.errors import UserError
from rsdet_compress.runtime.loader import load_model

#: largest inference side when sizing from the image (a 10k scene needs slicing, not one pass).
MAX_SIDE = 4096
#: slice automatically when the rescaled image is more than this many times the model's input.
SLICE_FACTOR = 2.0
#: longest side of the drawn preview of a scene too large to decode at once.
PREVIEW_SIDE = 2048
#: raster formats GDAL reads beyond the common image suffixes.
RASTER_SUFFIXES = (*IMAGE_SUFFIXES, ".jp2", ".vrt", ".img", ".ntf", ".nitf")
_TIFF = (".tif", ".tiff")


def _sources(source: Path) -> list[Path]:
    if source.is_dir():
        files = list_images(source)
        if not files:
            raise UserError(f"{source}: no images found")
        return files
    if not source.is_file():
        raise UserError(f"{source}: no such file or folder")
    if source.suffix.lower() not in RASTER_SUFFIXES:
        raise UserError(f"{source}: not an image file ({', '.join(RASTER_SUFFIXES)})")
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


def detect(model, image: np.ndarray, imgsz: int, conf: float = 0.25, iou: float = 0.7,
           max_det: int = 1000) -> np.ndarray:
    """Detections (N x 6: x1 y1 x2 y2 score cls) of one RGB image in one pass, in its own pixels."""
    chip, ((gh, gw), (pl, pt)) = letterbox(image, imgsz)
    det = detect_chips(model, chip[None], conf, iou, max_det)[0].astype(np.float64)
    h, w = image.shape[:2]
    det[:, [0, 2]] = np.clip((det[:, [0, 2]] - pl) / gw, 0, w)
    det[:, [1, 3]] = np.clip((det[:, [1, 3]] - pt) / gh, 0, h)
    return det


def model_input_size(meta: dict) -> int:
    """The model's training input side (checkpoint ``imgsz``, else its chip ``tile``, else 640)."""
    for key in ("imgsz", "tile"):
        v = meta.get(key)
        if isinstance(v, (int, float)) and v > 0:
            return int(v)
        if isinstance(v, (list, tuple)) and v:
            return int(max(v))
    return 640


def plan_slice(h: int, w: int, rescale: float, model_size: int, imgsz: int | None,
               slice_size: int | None, decoded: bool) -> int | None:
    """The slice size to use for an ``h`` x ``w`` image, or None for one whole-image pass."""
    if slice_size is not None:
        return slice_size
    if not decoded:  # too large to hold at once: tiles whatever was asked
        return imgsz or model_size
    if imgsz is None and max(h, w) * rescale > SLICE_FACTOR * model_size:
        return model_size
    return None


def _coco_rows(coco: dict, image_id: int, dets: np.ndarray, names: list[str]) -> None:
    for x1, y1, x2, y2, score, cls in dets.tolist():
        coco["annotations"].append({
            "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": int(cls) + 1,
            "category": names[int(cls)], "bbox": [round(x1, 1), round(y1, 1), round(x2 - x1, 1),
                                                   round(y2 - y1, 1)], "score": round(score, 4)})


def _write_drawing(reader: SceneReader, dets: np.ndarray, names: list[str], folder: Path) -> float:
    """The drawn image (full size, or a preview of a huge scene) in ``folder``; returns its scale."""
    f = reader.path
    if reader.decoded:
        image, scale = reader.read(Tile(0, 0, reader.width, reader.height)), 1.0
        ext = ".jpg" if f.suffix.lower() in (".jpg", ".jpeg") else ".png"
    else:
        image, scale = reader.overview(PREVIEW_SIDE)
        ext = ".jpg"
    scaled = dets.copy()
    scaled[:, :4] *= scale
    target = folder / f"{f.stem}{ext}"
    if not cv2.imwrite(str(target), draw(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), scaled, names)):
        raise UserError(f"{target}: cannot write the drawn image")  # cv2 reports failure only by its return value
    return scale


class SkippedImageWarning(UserWarning):
    """An unreadable or truncated image in a folder, left out of the results (listed in ``info.skipped``)."""


def _predict_one(model, f: Path, image_id: int, folder: Path, names: list[str], base: SliceOptions,
                 model_size: int, imgsz: int | None, progress: bool) -> tuple[dict, np.ndarray]:
    """Detections of one image, its drawing (and GeoJSON) written to ``folder``; (COCO image entry, detections).

    A corrupt file raises :class:`CorruptImage` before anything of it is written.
    """
    rescale = base.rescale
    with SceneReader(f) as reader:
        h, w = reader.height, reader.width
        entry = {"id": image_id, "file_name": f.name, "path": str(f), "width": w, "height": h}
        size = plan_slice(h, w, rescale, model_size, imgsz, base.slice_size, reader.decoded)
        if size is not None:
            opts = dataclasses.replace(base, slice_size=size)
            dets, tiles = predict_sliced(model, reader, opts, progress)
            entry["sliced"] = {"slice": size, "window": round(size / rescale), "overlap": base.overlap,
                               "tiles": tiles, "merge": base.merge, "full_pass": base.full_pass}
        else:
            entry["inference_size"] = imgsz if imgsz is not None else inference_size(h, w, rescale, base.stride)
            dets = detect(model, reader.read(Tile(0, 0, w, h)), entry["inference_size"], base.conf, base.iou)
        scale = _write_drawing(reader, dets, names, folder)
        if scale != 1.0:
            entry["preview_scale"] = round(scale, 6)
        georef = georef_of(reader.transform, reader.crs, reader.gcps)
        if georef is not None or f.suffix.lower() in _TIFF:
            write_geojson(folder / f"{f.stem}.geojson", to_geojson(dets, names, georef, str(f)))
    return entry, dets


def predict(weights: str | Path, source: str | Path, out: str | Path, imgsz: int | None = None,
            conf: float = 0.25, iou: float = 0.7, device: str = "cpu", slice_size: int | None = None,
            overlap: float = 0.2, merge: str = "nms", full_pass: bool = False, batch: int = 8,
            progress: bool = True, overwrite: bool = False) -> dict:
    """Detect objects in an image or a folder; write drawn images, ``detections.json`` and GeoJSON to ``out``.

    ``slice_size`` (model-input pixels, at the training scale) forces sliced
    inference with windows overlapping by ``overlap``, ``batch`` windows per
    forward pass, merged by ``merge`` (``nms`` or ``wbf``), plus a full-image
    pass at reduced resolution with ``full_pass``. The output folder is
    assembled in a hidden sibling and renamed into place at the end
    (:func:`rsdet_compress.atomic.staged_dir`), so an interrupted run leaves no
    partial results behind; an existing ``out`` is refused unless ``overwrite``,
    and ``out`` may not be or lie inside ``source``. Returns the COCO-style dict.
    """
    base = SliceOptions(slice_size=slice_size, overlap=overlap, batch=batch, conf=conf, iou=iou,
                        merge=merge, full_pass=full_pass)  # checks the flags before any work
    check_imgsz(imgsz)
    files = _sources(Path(source))
    model, meta = load_model(weights)
    if isinstance(model, torch.nn.Module):
        model.to(device).eval()
    names = meta.get("names") or [str(i) for i in range(meta["num_classes"])]
    rescale = float(meta.get("rescale") or 1.0)
    stride = getattr(model, "stride", None)
    stride = int(max(torch.as_tensor(stride).flatten().tolist())) if stride is not None else 32
    base = dataclasses.replace(base, rescale=rescale, stride=max(1, stride))
    model_size = model_input_size(meta)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
            "info": {"weights": str(weights), "conf": conf, "iou": iou, "rescale": rescale}}
    skipped = coco["info"]["skipped"] = []
    with staged_dir(out, overwrite=overwrite, protect=(source, weights)) as tmp:
        for f in files:
            image_id = len(coco["images"]) + 1
            try:
                entry, dets = _predict_one(model, f, image_id, tmp, names, base, model_size, imgsz, progress)
            except CorruptImage as e:
                if len(files) == 1:
                    raise  # the one image asked for: an error, not an empty result
                skipped.append({"path": str(f), "reason": str(e)})
                warnings.warn(f"{e}; skipped", SkippedImageWarning, stacklevel=2)
                continue
            _coco_rows(coco, image_id, dets, names)
            coco["images"].append(entry)
        if not coco["images"]:
            raise UserError(f"{source}: none of its {len(files)} images is readable ({skipped[0]['reason']})")
        write_json(tmp / "detections.json", coco, indent=1)
    return coco
