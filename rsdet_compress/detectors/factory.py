"""The factory (timm's ``create_model``): a registered detector, optionally starting from local weights."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from rsdet_compress.detectors.checkpoint import load_float_detector
from rsdet_compress.detectors.registry import build_detector


def create_detector(name: str, num_classes: int = 80, weights: str | Path | None = None,
                    names: list[str] | None = None) -> nn.Module:
    """Build detector ``name`` for ``num_classes`` classes, optionally loading local ``weights``.

    ``weights`` may be one of our float checkpoints (must match exactly) or an
    ultralytics ``.pt`` (tensors whose shapes match are transferred, as
    ultralytics does when fine-tuning from a pretrained model).
    """
    model = build_detector(name, num_classes, names)
    if weights is not None:
        src, meta = load_float_detector(weights)
        if meta.get("detector") == name and meta.get("num_classes") == num_classes:
            model.load_state_dict(src.state_dict())
        else:
            model.load(src, verbose=False)
    return model
