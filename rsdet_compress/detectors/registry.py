"""Detector registry (timm style): every detector the toolkit builds, by name.

``build_detector(name, num_classes)`` builds any registered detector from code
or its model YAML (nothing is downloaded); ``@register_detector(name)`` adds
one. Reading and writing weights files is :mod:`rsdet_compress.detectors.checkpoint`;
building with weights, :mod:`rsdet_compress.detectors.factory`.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn
from ultralytics.nn.tasks import yaml_model_load

from rsdet_compress.detectors.arch import from_arch
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


def _from_yaml(cfg: str) -> Callable[[int], nn.Module]:
    """Builder of the ultralytics model YAML ``cfg`` (its scale from the name, e.g. ``yolov8s.yaml``)."""
    def build(num_classes: int) -> nn.Module:
        return from_arch(yaml_model_load(cfg), num_classes, source=cfg)
    return build


@register_detector("skynet")
def skynet(num_classes: int) -> nn.Module:
    return SkyNet(nc=num_classes)


#: the ultralytics YOLO detect models built by name: three scales of each generation (the larger ones
#: are what users fine-tune on VisDrone or DOTA) and the P2 head for objects of a few pixels. Any other
#: ultralytics detect YAML still works: checkpoints carry their architecture (detectors.arch).
ULTRALYTICS_YAMLS = ("yolov8n", "yolov8s", "yolov8m", "yolo11n", "yolo11s", "yolo11m", "yolov8n-p2")
for _name in ULTRALYTICS_YAMLS:
    register_detector(_name)(_from_yaml(f"{_name}.yaml"))


def build_detector(name: str, num_classes: int = 80, names: list[str] | None = None,
                   arch: dict | None = None) -> nn.Module:
    """Float detector ``name`` for ``num_classes`` classes with fresh weights.

    ``arch``, an ultralytics model YAML dict (what checkpoints store, :mod:`.arch`), builds it
    without the registry, so ``name`` need not be registered. Loading weights is
    :func:`rsdet_compress.detectors.factory.create_detector`.
    """
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    if arch is not None:
        model = from_arch(arch, num_classes, source=name)
    elif name in DETECTORS:
        model = DETECTORS[name](num_classes)
    else:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(list_detectors())}")
    model.detector_name = name
    model.names = dict(enumerate(names)) if names else {i: str(i) for i in range(num_classes)}
    return model
