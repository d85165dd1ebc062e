"""A detector's architecture as plain data, so any ultralytics YOLO detect model rebuilds without the registry.

Every ultralytics ``DetectionModel`` carries the model YAML it was built from
as a dict (``model.yaml``: backbone and head layer lists, depth/width scale,
class count). Our checkpoints and packed files store that dict next to the
detector's name, so a YOLOv8s trained on VisDrone, a YOLO11m, a P2 or P6 head
or a YAML of the user's own rebuilds exactly, registered or not. Detectors
written in code (SkyNet) have no such dict and rebuild from the registry.

Only detection is supported: segment / pose / OBB / YOLOE heads subclass
``Detect`` and end-to-end (NMS-free) heads decode differently, so both are
refused by :func:`check_detect` with one line before any work.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from torch import nn
from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import DetectionModel

from rsdet_compress.errors import UserError

#: the head modules whose raw output our evaluation, compression and export understand (not subclasses)
DETECT_HEADS = (Detect,)


def arch_of(model: nn.Module) -> dict | None:
    """The ultralytics model YAML dict ``model`` was built from, as plain JSON data; None for code-built models."""
    spec = getattr(model, "yaml", None)
    if not isinstance(model, DetectionModel) or not isinstance(spec, dict) or not {"backbone", "head"} <= set(spec):
        return None
    try:
        # a JSON round trip: only plain data reaches a weights_only checkpoint and the packed file's header
        return json.loads(json.dumps(spec))
    except (TypeError, ValueError):
        raise UserError("the model's YAML description is not plain data, so it cannot be stored") from None


def arch_name(spec: dict) -> str:
    """A name for an architecture description: its YAML file's stem (``yolov8s``, ``yolov8n-p2``)."""
    return Path(str(spec.get("yaml_file") or "ultralytics")).stem


def from_arch(spec: dict, num_classes: int, source: str = "checkpoint") -> nn.Module:
    """The float detector an ultralytics model YAML dict describes, with fresh weights and ``num_classes`` classes."""
    if not isinstance(spec, dict) or not {"backbone", "head"} <= set(spec):
        raise UserError(f"{source}: architecture description has no 'backbone' and 'head' layer lists")
    # nc set in the spec up front: otherwise ultralytics logs "Overriding model.yaml nc=..." to stdout,
    # which breaks `evaluate --json` (stdout must be one JSON object).
    spec = {**copy.deepcopy(spec), "nc": num_classes}
    try:
        model = DetectionModel(spec, nc=num_classes, verbose=False)
    except Exception as e:  # an unknown module name, a malformed layer row...
        raise UserError(f"{source}: cannot build the stored architecture "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})") from None
    check_detect(model, source)
    return model


def check_detect(model: nn.Module, source: str) -> None:
    """Refuse anything but a plain detect model: segment, pose, OBB and end-to-end heads, with one line."""
    head = model.model[-1] if isinstance(getattr(model, "model", None), nn.Sequential) else None
    if head is None or not hasattr(head, "nc"):
        raise UserError(f"{source}: not a detection model (no detection head)")
    kind = type(head).__name__
    if isinstance(model, DetectionModel) and type(head) not in DETECT_HEADS:
        task = {"Segment": "segment", "Pose": "pose", "OBB": "obb"}.get(kind.removesuffix("26"), kind)
        raise UserError(f"{source}: a {task} model ({kind} head); only detect models (Detect head) are supported")
    if getattr(head, "end2end", False):
        raise UserError(f"{source}: an end-to-end (NMS-free) {kind} head is not supported; "
                        "train it with end2end=False")
