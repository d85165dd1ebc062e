"""``evaluate``: COCO mAP of a checkpoint on a prepared split, with its size and GFLOPs."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rsdet_compress.compress.calibration import calibration_set
from rsdet_compress.compress.compressor import Workspace
from rsdet_compress.compress.cost import estimate
from rsdet_compress.compress.policy import Policy
from rsdet_compress.data.config import load_data_config
from rsdet_compress.data.evalset import EvalSet
from rsdet_compress.detectors.checkpoint import check_classes
from rsdet_compress.engine.evaluator import Evaluator, torch_device
from rsdet_compress.errors import UserError
from rsdet_compress.runtime.loader import load_model

#: every detector here downsamples by 32 at its deepest level: other sizes break the feature-map concats
SIZE_MULTIPLE = 32


def check_imgsz(imgsz: int | None, flag: str = "--imgsz") -> None:
    """None (the model's own size) or a positive multiple of 32; 0 is an error, not "default"."""
    if imgsz is not None and (imgsz < SIZE_MULTIPLE or imgsz % SIZE_MULTIPLE):
        raise UserError(f"{flag} must be a positive multiple of {SIZE_MULTIPLE}, got {imgsz}")


def check_batch(batch: int, flag: str = "--batch") -> None:
    if batch < 1:
        raise UserError(f"{flag} must be >= 1, got {batch}")


def count_params(model: nn.Module) -> int:
    """Number of parameters (BN affine included, buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def gflops(model: nn.Module, imgsz: int) -> float:
    """Forward GFLOPs (2 x multiply-accumulates) at ``imgsz`` x ``imgsz``, by torch's flop counter."""
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(torch.zeros(1, 3, imgsz, imgsz, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def evaluate(weights: str | Path, data: str | Path, split: str = "val", imgsz: int | None = None,
             batch: int = 16, device: str = "cpu", conf: float = 0.001, iou: float = 0.7,
             max_images: int | None = None) -> dict:
    """Score ``weights`` on ``split`` of dataset YAML ``data`` with pycocotools.

    Returns mAP@0.5, mAP@0.5:0.95, AP small/medium/large, per-class AP,
    parameters and GFLOPs at the evaluation size. ``imgsz`` defaults to the
    size the checkpoint was trained at. Weights whose classes are not the data
    set's are refused (their scores would be silently wrong).
    """
    check_imgsz(imgsz)
    check_batch(batch)
    model, meta = load_model(weights)  # checkpoints, ONNX (fp32/int8) and packed files alike
    cfg = load_data_config(data)
    check_classes(meta, cfg.names, weights, data)
    imgsz = int(imgsz if imgsz is not None else meta.get("imgsz") or 640)
    evalset = EvalSet.from_coco(cfg.split_coco(split), cfg.split_images(split), imgsz, max_images=max_images)
    model.to(torch_device(device))
    metrics = Evaluator(evalset, conf=conf, iou=iou, batch=batch, device=device)(model)
    return {"weights": str(weights), "detector": meta.get("detector"), "split": split, "imgsz": imgsz,
            **metrics, **({"params": None, "gflops": None} if meta.get("runtime") else  # torch cannot count a session
                          {"params": count_params(model), "gflops": round(gflops(model, imgsz), 3)}),
            **compression_report(model)}


def compression_report(model) -> dict:
    """A compressed model's deployed size and how many times smaller / cheaper than its float model.

    Sizes are the policy's exact weight bits (the packed file's payload), FLOPs and BOPs at the
    policy's input size, as ``evaluate --policy`` and the search report them. Empty for float models.
    """
    cost, ref = getattr(model, "cost", None), getattr(model, "float_cost", None)
    if cost is None or ref is None:
        return {}
    return {"size_mb": round(cost.size_mb, 4), "float_size_mb": round(ref.size_mb, 4),
            "gbops": round(cost.gbops, 3), "ratios": {k: round(v, 3) for k, v in cost.ratios(ref).items()}}


def evaluate_policy(weights: str | Path, policy: str | Path, data: str | Path, split: str = "val",
                    batch: int = 16, device: str = "cpu", calib_images: int = 64) -> dict:
    """Float vs compressed side by side: COCO mAP (after BN recalibration) and the exact cost of each.

    The policy is applied in memory; calibration uses training chips, never ``split``.
    """
    check_batch(batch)
    ws = Workspace.from_weights(weights)
    cfg = load_data_config(data)
    check_classes(ws.meta, cfg.names, weights, data)
    imgsz = ws.view.imgsz
    ws.grad_set = calib = calibration_set(str(data), imgsz, calib_images)
    resolved = ws.resolve(Policy.load(policy), source=str(policy))
    evalset = EvalSet.from_coco(cfg.split_coco(split), cfg.split_images(split), imgsz)
    evaluator = Evaluator(evalset, batch=batch, device=device)
    compressed = ws.apply(resolved, calib)
    out = {}
    ref, cost_c = estimate(ws.view), estimate(ws.view, resolved)
    for label, model, cost in (("float", ws.view.model, ref), ("compressed", compressed, cost_c)):
        m = evaluator(model.to(evaluator.device))
        out[label] = {"map50": m["map50"], "map50_95": m["map50_95"], "per_class": m["per_class"],
                      "params": cost.params, "size_mb": cost.size_mb, "gflops": cost.gflops, "gbops": cost.gbops}
    out["ratios"] = cost_c.ratios(ref)
    out.update(split=split, imgsz=imgsz, weights=str(weights), policy=str(policy))
    return out
