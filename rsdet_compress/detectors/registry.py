"""Detector registry (timm style) and the checkpoint format.

``create_detector(name, num_classes, weights)`` builds any registered detector
from code or its model YAML (nothing is downloaded); ``load_detector(path)``
reloads what :func:`save_detector` wrote, or a local ultralytics ``.pt``.

Our checkpoint is a plain dict of tensors and builtins (loadable with
``torch.load(weights_only=True)``), always fp32, carrying the detector name
so the structure is rebuilt from code, never from a pickled module.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rsdet_compress.errors import UserError

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics must never try the network

CHECKPOINT_FORMAT = "rsdet-compress"
CHECKPOINT_VERSION = 1

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
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load
    # nc set in the spec up front: otherwise ultralytics logs "Overriding model.yaml nc=..." to stdout,
    # which breaks `evaluate --json` (stdout must be one JSON object).
    spec = {**yaml_model_load(cfg), "nc": num_classes}
    return DetectionModel(spec, nc=num_classes, verbose=False)


@register_detector("skynet")
def skynet(num_classes: int) -> nn.Module:
    from rsdet_compress.detectors.skynet import SkyNet
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

    ``weights`` may be one of our checkpoints (must match exactly) or an
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
        src, meta = load_detector(weights)
        if meta.get("detector") == name and meta.get("num_classes") == num_classes:
            model.load_state_dict(src.state_dict())
        else:
            model.load(src, verbose=False)
    return model


def save_detector(model: nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``model`` as an fp32 checkpoint (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = getattr(model, "names", None) or {}
    ckpt = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "detector": getattr(model, "detector_name", None),
        "num_classes": int(model.model[-1].nc),
        "names": [str(names[i]) for i in sorted(names)],
        "state_dict": {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
                       for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    policy = getattr(model, "policy", None)
    if policy is not None:  # a compressed model: its structure is rebuilt from the resolved policy
        ckpt["policy"] = policy.to_dict()
    if ckpt["detector"] is None:
        raise ValueError("model has no detector_name; build it with create_detector()")
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


def load_detector(path: str | Path) -> tuple[nn.Module, dict]:
    """Load a checkpoint -> (model in eval mode, metadata).

    Metadata holds ``detector``, ``num_classes``, ``names`` and whatever the
    writer stored in ``meta`` (image size, data-set scale, metrics).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return _load_ultralytics(path)
    except Exception as e:  # truncated zip, not a torch file at all...
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not an rsdet-compress or ultralytics checkpoint")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint version {ckpt['version']} is newer than this rsdet-compress")
    name, nc = ckpt.get("detector"), ckpt.get("num_classes")
    if name not in DETECTORS:
        raise UserError(f"{path}: unknown detector {name!r} in checkpoint")
    model = create_detector(name, nc, names=ckpt.get("names"))
    if "policy" in ckpt:
        model = _rebuild_compressed(model, ckpt["policy"], path)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path}: weights do not fit detector {name!r} ({str(e).splitlines()[0][:100]})") from None
    meta = {**ckpt.get("meta", {}), "detector": name, "num_classes": nc, "names": ckpt.get("names"),
            "compressed": "policy" in ckpt}
    return model.eval(), meta


def _rebuild_compressed(skeleton: nn.Module, policy_dict: dict, path: Path) -> nn.Module:
    """The compressed structure (pruned shapes, skipped blocks, quantized convs) for loading its weights."""
    from rsdet_compress.compress.apply import apply_policy
    from rsdet_compress.compress.policy import Policy
    from rsdet_compress.compress.view import CompressibleView
    policy = Policy.from_dict(policy_dict, source=str(path))
    if any("keep_idx" not in g for g in policy.groups.values()):
        raise UserError(f"{path}: compressed checkpoint carries an unresolved policy")
    view = CompressibleView(skeleton, imgsz=policy.imgsz)
    return apply_policy(view, policy, share_weights=False)


def _load_ultralytics(path: Path) -> tuple[nn.Module, dict]:
    """A local ultralytics .pt (pickled DetectionModel): fp32, eval mode, name from its YAML."""
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint
    try:
        model, ckpt = load_checkpoint(path)
    except Exception as e:
        raise UserError(f"{path}: not a readable ultralytics checkpoint ({type(e).__name__})") from None
    if not isinstance(model, DetectionModel):
        raise UserError(f"{path}: ultralytics checkpoint is not a detection model")
    stem = Path(str(model.yaml.get("yaml_file", "ultralytics"))).stem
    model.detector_name = stem if stem in DETECTORS else None
    names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
    args = ckpt.get("train_args", {}) or {}
    meta = {"detector": model.detector_name or f"ultralytics:{stem}", "num_classes": int(model.model[-1].nc),
            "names": [str(names[i]) for i in sorted(names)], "imgsz": args.get("imgsz"),
            "source": "ultralytics"}
    return model.float().eval(), meta
