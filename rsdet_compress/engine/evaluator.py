"""COCO bbox metrics for a detector on a cached :class:`EvalSet`.

:func:`coco_metrics` scores an N x 7 detection array with pycocotools' COCOeval
(the reference implementation, so numbers compare with published ones).
:class:`Evaluator` runs a model over an EvalSet in batches (forward + NMS), maps
boxes back to original pixels and returns those metrics plus throughput. It is
built once per split and called once per candidate model in a search.
"""
from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from ultralytics.utils import ops
from ultralytics.utils.nms import non_max_suppression

from rsdet_compress.data.evalset import EvalSet

_AREAS = ("all", "small", "medium", "large")


def _mean_valid(values: np.ndarray) -> float | None:
    """Mean of the entries COCO filled in (> -1); None when there are none (no ground truth)."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def _results_coco(coco_gt: COCO, dets: np.ndarray) -> COCO:
    """A COCO object holding ``dets`` as results.

    Does what ``COCO.loadRes`` does for boxes, without its assertion on empty
    input and without building an unused polygon per box.
    """
    anns = [
        {"id": i + 1, "image_id": int(r[0]), "bbox": [r[1], r[2], r[3], r[4]], "area": r[3] * r[4],
         "score": r[5], "category_id": int(r[6]), "iscrowd": 0}
        for i, r in enumerate(dets.tolist())
    ]
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                   "categories": list(coco_gt.dataset.get("categories", [])),
                   "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_metrics(coco_gt: COCO, detections: np.ndarray, max_dets: int = 100,
                 image_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """COCO bbox metrics of ``detections`` against ``coco_gt``.

    Args:
        coco_gt: ground truth; ``iscrowd: 1`` boxes are ignored (neither hit nor miss).
        detections: N x 7 array ``[image_id, x, y, w, h, score, category_id]`` in
            original-image pixels. May be empty (every class with ground truth gets AP 0).
        max_dets: detections kept per image and class, highest scores first (COCO's maxDets).
        image_ids: the images evaluated; default all of ``coco_gt``. Pass the subset
            actually predicted on, or the ground truth of the others counts as missed.

    Returns:
        ``map50``, ``map50_95``, ``ap_small``, ``ap_medium``, ``ap_large`` (0..1, or None
        where COCO reports -1: no ground truth there), ``per_class`` =
        ``{name: {"ap50", "ap50_95"}}`` (None for a class without ground truth) and
        ``num_detections``.
    """
    ev = coco_evaluated(coco_gt, detections, max_dets, image_ids)
    return {**resampled_metrics(ev, ev.params.imgIds, int(max_dets)), "num_detections": len(ev.cocoDt.anns)}


def coco_evaluated(coco_gt: COCO, detections: np.ndarray, max_dets: int = 100,
                   image_ids: Sequence[int] | None = None) -> COCOeval:
    """``detections`` matched to ``coco_gt`` image by image (``COCOeval.evaluate``), not yet accumulated:
    what :func:`coco_metrics` reads its metrics from and :func:`resampled_metrics` resamples. Same
    arguments and checks as :func:`coco_metrics`.
    """
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    dets = np.asarray(detections, dtype=np.float64)
    if dets.size == 0:
        dets = np.zeros((0, 7))
    if dets.ndim != 2 or dets.shape[1] != 7:
        raise ValueError(f"detections must be N x 7, got shape {dets.shape}")
    known = set(coco_gt.getImgIds())
    unknown = set(dets[:, 0].astype(np.int64).tolist()) - known
    if unknown:
        raise ValueError(f"detections on image ids not in the ground truth: {sorted(unknown)[:5]}")

    ev = COCOeval(coco_gt, _results_coco(coco_gt, dets), "bbox")
    ev.params.imgIds = sorted(known) if image_ids is None else [int(i) for i in image_ids]
    # COCOeval sorts maxDets and evaluates at the largest, so find ours after sorting.
    ev.params.maxDets = sorted({1, 10, int(max_dets)})
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
    return ev


def resampled_metrics(ev: COCOeval, image_ids: Sequence[int], max_dets: int) -> dict[str, Any]:
    """:func:`coco_metrics` of an evaluated set (:func:`coco_evaluated`) over ``image_ids``, repeats allowed
    (a bootstrap resample), without matching again: COCO matches each image on its own, so a resample
    only re-accumulates. ``ev`` is left as it was.
    """
    pos = {i: n for n, i in enumerate(ev._paramsEval.imgIds)}
    per_image = ev.evalImgs  # the per-image matching evaluate() did; restored below
    n_img, n_area = len(pos), len(ev._paramsEval.areaRng)
    order = [pos[int(i)] for i in image_ids]
    ev.evalImgs = [per_image[(k * n_area + a) * n_img + i] for k in range(len(ev._paramsEval.catIds))
                   for a in range(n_area) for i in order]
    saved = ev.params.imgIds, ev._paramsEval.imgIds
    ev.params.imgIds = ev._paramsEval.imgIds = list(range(len(order)))  # a repeated image counts again
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ev.accumulate()
    finally:
        ev.params.imgIds, ev._paramsEval.imgIds = saved
        ev.evalImgs = per_image
    md = ev.params.maxDets.index(max_dets)
    precision = ev.eval["precision"]  # [T iou, R recall, K class, A area, M maxDets]
    t50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    area = {lbl: ev.params.areaRngLbl.index(lbl) for lbl in _AREAS}
    all_ = precision[:, :, :, area["all"], md]
    per_class: dict[str, dict[str, float | None]] = {}
    for k, cat_id in enumerate(ev.params.catIds):
        per_class[str(ev.cocoGt.cats[cat_id]["name"])] = {
            "ap50": _mean_valid(all_[t50, :, k]),
            "ap50_95": _mean_valid(all_[:, :, k]),
        }
    return {
        "map50": _mean_valid(all_[t50]),
        "map50_95": _mean_valid(all_),
        "ap_small": _mean_valid(precision[:, :, :, area["small"], md]),
        "ap_medium": _mean_valid(precision[:, :, :, area["medium"], md]),
        "ap_large": _mean_valid(precision[:, :, :, area["large"], md]),
        "per_class": per_class,
    }


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    """Float dtype the model's weights use (fp16 models get fp16 input); float32 if none."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def torch_device(spec: str | torch.device) -> torch.device:
    """A device as ultralytics and our configs spell it ("cpu", "0", "0,1", "cuda:0"), as torch wants it.

    ``device: 0`` means the first GPU to the trainer, but ``torch.device("0")`` is an error, which
    crashed the final evaluation after a whole GPU training run. Several GPUs evaluate on the first.
    """
    if isinstance(spec, torch.device):
        return spec
    first = str(spec).strip().split(",")[0].strip()
    return torch.device(f"cuda:{first}" if first.isdigit() else first)
class Evaluator:
    """Scores detectors on one :class:`EvalSet`: batched forward, NMS, COCOeval.

    Thresholds follow ultralytics validation (conf 0.001, IoU 0.7, multi-label
    NMS) so numbers are comparable with ``model.val()``. The COCO evaluation
    keeps up to ``max_det`` detections per image (COCO's own default is 100),
    which matters for dense aerial scenes.

    The model must already be on ``device``; the cached images are moved there once.
    """

    def __init__(self, evalset: EvalSet, conf: float = 0.001, iou: float = 0.7, max_det: int = 300,
                 batch: int = 16, device: str = "cpu", multi_label: bool = True) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.evalset = evalset
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.batch, self.multi_label = batch, multi_label
        self.device = torch_device(device)
        self._images = evalset.images.to(self.device)
        self._cat_ids = np.asarray(evalset.category_ids, dtype=np.float64)

    def _to_rows(self, det: torch.Tensor, index: int) -> np.ndarray:
        """One image's NMS output (xyxy in input pixels, conf, cls) as N x 7 COCO rows."""
        es = self.evalset
        det = det[:, :6].float().cpu()
        boxes = ops.scale_boxes((es.imgsz, es.imgsz), det[:, :4].clone(), es.shapes[index],
                                ratio_pad=es.ratio_pad[index]).numpy().astype(np.float64)
        cls = det[:, 5].numpy().astype(np.int64)
        if cls.size and cls.max() >= len(self._cat_ids):
            raise ValueError(f"model predicts class index {int(cls.max())} but the evaluation set "
                             f"has {len(self._cat_ids)} categories")
        rows = np.empty((det.shape[0], 7), dtype=np.float64)
        rows[:, 0] = es.image_ids[index]
        rows[:, 1:3] = boxes[:, :2]
        rows[:, 3:5] = boxes[:, 2:4] - boxes[:, :2]
        rows[:, 5] = det[:, 4].numpy()
        rows[:, 6] = self._cat_ids[cls]
        return rows

    def predict(self, model: torch.nn.Module) -> tuple[np.ndarray, float]:
        """All detections on the set as N x 7 COCO rows, and the forward + NMS seconds.

        Leaves the model in the train/eval mode it had.
        """
        was_training = model.training
        end2end = bool(getattr(model, "end2end", False))
        dtype = _input_dtype(model)
        rows: list[np.ndarray] = [np.zeros((0, 7))]
        seconds = 0.0
        model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(self._images), self.batch):
                    t0 = time.perf_counter()
                    x = self._images[start:start + self.batch].to(dtype).div_(255)
                    out = model(x)
                    preds = out[0] if isinstance(out, (tuple, list)) else out
                    if not end2end and preds.ndim == 3 and preds.shape[-1] == 6:
                        # ultralytics' NMS takes a last dim of 6 to mean end-to-end output;
                        # a zero-score seventh anchor keeps 6 real anchors on the NMS path.
                        preds = torch.cat([preds, preds.new_zeros(*preds.shape[:2], 1)], dim=-1)
                    dets = non_max_suppression(preds, self.conf, self.iou, multi_label=self.multi_label,
                                               max_det=self.max_det, end2end=end2end,
                                               max_time_img=1e6)  # never drop images for time
                    dets = [d.cpu() for d in dets]  # also waits for the device
                    seconds += time.perf_counter() - t0
                    rows.extend(self._to_rows(d, start + i) for i, d in enumerate(dets))
        finally:
            model.train(was_training)
        return np.concatenate(rows), seconds

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        """COCO metrics of ``model`` on the set, plus ``images``, ``seconds``, ``images_per_second``.

        ``seconds`` times input conversion, forward and NMS only (not COCOeval).
        """
        dets, seconds = self.predict(model)
        metrics = coco_metrics(self.evalset.coco, dets, max_dets=self.max_det,
                               image_ids=self.evalset.image_ids)
        n = len(self.evalset)
        metrics.update(images=n, seconds=seconds,
                       images_per_second=n / seconds if seconds > 0 else 0.0)
        return metrics
