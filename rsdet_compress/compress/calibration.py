"""Data-driven repairs after compression, without gradient steps: BN statistics and activation ranges.

Pruning and quantization shift every layer's output distribution; the BN
running statistics of the float model no longer match. Re-estimating them on
a few training batches is what makes no-fine-tune mAP a meaningful reward.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from rsdet_compress.compress.quant import calibrate_activations
from rsdet_compress.engine.evalset import EvalSet


def image_batches(evalset: EvalSet, batch: int = 16, device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
    """Float batches (0..1) from an EvalSet's cached uint8 images."""
    for start in range(0, len(evalset), batch):
        yield evalset.images[start:start + batch].to(device).float().div_(255)


def calibration_set(data_yaml: str, imgsz: int, n_images: int = 64, split: str = "train") -> EvalSet:
    """The first ``n_images`` chips of ``split`` (training data: never the reporting split), decoded once."""
    from rsdet_compress.data.config import load_data_config
    cfg = load_data_config(data_yaml)
    return EvalSet.from_coco(cfg.split_coco(split), cfg.split_images(split), imgsz, max_images=n_images)


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
        recalibrate_bn(model, image_batches(evalset, batch, device))
    calibrate_activations(model, image_batches(evalset, batch, device))
    return model
