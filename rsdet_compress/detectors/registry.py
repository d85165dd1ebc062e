"""Detector registry (timm style): every detector the toolkit builds, by name.

``create_detector(name, num_classes, weights)`` builds any registered detector
from code or its model YAML (nothing is downloaded); ``@register_detector(name)``
adds one. Reading and writing weights files is :mod:`rsdet_compress.detectors.checkpoint`.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn
from ultralytics.nn.tasks import DetectionModel, yaml_model_load

from rsdet_compress.detectors.skynet import SkyNet
from rsdet_compress.errors import UserError

DETECTORS: dict[str, Callable[[int], nn.Module]] = {}


def register_detector(name: str) -> Callable:
    """Register ``fn(num_classes) -> DetectionModel`` under ``name``."""
    def deco(fn: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        DETECTORS[name] = fn
        return fn
    return deco


def list_detectors() -> list[str]:
    """Names accepted by :func:`create_detector`."""
    return sorted(DETECTORS)


def _from_yaml(cfg: str, num_classes: int) -> nn.Module:
    # nc set in the spec up front: otherwise ultralytics logs "Overriding model.yaml nc=..." to stdout,
    # which breaks `evaluate --json` (stdout must be one JSON object).
    spec = {**yaml_model_load(cfg), "nc": num_classes}
    return DetectionModel(spec, nc=num_classes, verbose=False)


@register_detector("skynet")
def skynet(num_classes: int) -> nn.Module:
    return SkyNet(nc=num_classes)


@register_detector("yolov8n")
def yolov8n(num_classes: int) -> nn.Module:
    return _from_yaml("yolov8n.yaml", num_classes)


@register_detector("yolo11n")
def yolo11n(num_classes: int) -> nn.Module:
    return _from_yaml("yolo11n.yaml", num_classes)


def create_detector(name: str, num_classes: int = 80, weights: str | Path | None = None,
                    names: list[str] | None = None) -> nn.Module:
    """Build detector ``name`` for ``num_classes`` classes, optionally loading local ``weights``.

    ``weights`` may be one of our float checkpoints (must match exactly) or an
    ultralytics ``.pt`` (tensors whose shapes match are transferred, as
    ultralytics does when fine-tuning from a pretrained model).
    """
    if name not in DETECTORS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(list_detectors())}")
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    model = DETECTORS[name](num_classes)
    model.detector_name = name
    model.names = dict(enumerate(names)) if names else {i: str(i) for i in range(num_classes)}
    if weights is not None:
        # checkpoint.py builds the models it loads through this registry, so it is imported at call time
        from rsdet_compress.detectors.checkpoint import load_float_detector
        src, meta = load_float_detector(weights)
        if meta.get("detector") == name and meta.get("num_classes") == num_classes:
            model.load_state_dict(src.state_dict())
        else:
            model.load(src, verbose=False)
    return model
