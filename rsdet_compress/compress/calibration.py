"""Data-driven repairs after compression, without gradient steps: BN statistics and activation ranges.

Pruning and quantization shift every layer's output distribution; the BN
running statistics of the float model no longer match. Re-estimating them on
a few training batches is what makes no-fine-tune mAP a meaningful reward.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from ultralytics.cfg import get_cfg

from rsdet_compress.compress.quant import calibrate_activations
from rsdet_compress.data.config import load_data_config
from rsdet_compress.data.evalset import EvalSet
from rsdet_compress.errors import UserError


def image_batches(evalset: EvalSet, batch: int = 16, device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
    """Float batches (0..1) from an EvalSet's cached uint8 images."""
    for start in range(0, len(evalset), batch):
        yield evalset.images[start:start + batch].to(device).float().div_(255)


def calibration_set(data_yaml: str, imgsz: int, n_images: int = 64, split: str = "train") -> EvalSet:
    """The first ``n_images`` chips of ``split`` (training data: never the reporting split), decoded once.

    Never empty: calibrating on no images resets every BN to mean 0 / variance 1
    and leaves activation ranges unmeasured, a broken model that looks fine.
    """
    check_calib_images(n_images)
    cfg = load_data_config(data_yaml)
    calib = EvalSet.from_coco(cfg.split_coco(split), cfg.split_images(split), imgsz, max_images=n_images)
    if len(calib) == 0:
        raise UserError(f"{data_yaml}: the '{split}' split has no images to calibrate on")
    return calib


def check_calib_images(n_images: int) -> None:
    """``--calib-images`` must name at least one image (checked before any work)."""
    if n_images < 1:
        raise UserError(f"--calib-images must be >= 1, got {n_images}")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate every BatchNorm's running mean/var on ``batches`` (cumulative average, no gradients).

    Restores each BN's momentum and the model's train/eval mode afterwards.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over all batches seen
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)
    return model


def calibrate(model: nn.Module, evalset: EvalSet, batch: int = 16, bn: bool = True) -> nn.Module:
    """BN recalibration (optional), then activation-range calibration, on the same cached images."""
    device = next(model.parameters()).device
    if bn:
        with warnings.catch_warnings():  # activations pass through in float until their ranges are set below
            warnings.filterwarnings("ignore", message="ActQuantizer used before calibration")
            recalibrate_bn(model, image_batches(evalset, batch, device))
    calibrate_activations(model, image_batches(evalset, batch, device))
    return model


def labelled_batches(evalset: EvalSet, batch: int = 16, device: str | torch.device = "cpu") -> Iterator[dict]:
    """ultralytics loss batches (``img``, ``batch_idx``, ``cls``, normalised ``bboxes``) from an EvalSet.

    Ground-truth boxes are moved from original pixels into the letterboxed
    frame with each image's ``ratio_pad``, then normalised to xywh in 0..1.
    """
    cat_index = {c: i for i, c in enumerate(evalset.category_ids)}
    size = float(evalset.imgsz)
    for start in range(0, len(evalset), batch):
        idx, cls, boxes = [], [], []
        for row, image_id in enumerate(evalset.image_ids[start:start + batch]):
            (gh, gw), (left, top) = evalset.ratio_pad[start + row]
            for ann in evalset.coco.imgToAnns.get(image_id, []):
                x, y, w, h = ann["bbox"]
                if w <= 0 or h <= 0:
                    continue
                cx, cy = (x + w / 2) * gw + left, (y + h / 2) * gh + top
                idx.append(row)
                cls.append(cat_index[ann["category_id"]])
                boxes.append((cx / size, cy / size, w * gw / size, h * gh / size))
        yield {"img": evalset.images[start:start + batch].to(device).float().div_(255),
               "batch_idx": torch.tensor(idx, dtype=torch.float32, device=device),
               "cls": torch.tensor(cls, dtype=torch.float32, device=device).view(-1, 1),
               "bboxes": torch.tensor(boxes, dtype=torch.float32, device=device).view(-1, 4)}


def accumulate_gradients(model: nn.Module, evalset: EvalSet, batch: int = 8) -> nn.Module:
    """Sum the detection loss's gradients over ``evalset`` into ``.grad`` (for the Taylor criterion).

    Uses the detector's own ultralytics loss (box + cls + DFL at the default
    gains). BN statistics are left untouched: the model runs in eval mode
    with gradients enabled. Existing gradients are cleared first.
    """
    if len(evalset) == 0:
        raise UserError("no labelled training images to compute Taylor importance on")
    if not hasattr(model, "loss"):
        raise UserError(f"{type(model).__name__} has no detection loss; Taylor importance needs one")
    if not hasattr(getattr(model, "args", None), "box"):  # loaded checkpoints carry no hyperparameters
        model.args = get_cfg()
    model.criterion = None  # built for this model's current shapes and device
    device = next(model.parameters()).device
    was_training = model.training
    model.zero_grad(set_to_none=True)
    model.eval()
    try:
        with torch.enable_grad():
            for b in labelled_batches(evalset, batch, device):
                loss, _ = model.loss(b)
                loss.sum().backward()
    finally:
        model.train(was_training)
        model.criterion = None
    return model
