"""From float weights + policy to a compressed, calibrated model (and checkpoint).

The steps every consumer shares (the ``compress`` and ``evaluate --policy``
commands now, the search later): build the view once, validate the policy
against it and the weights' fingerprint, rank channels, resolve, apply,
recalibrate BN and activation ranges on training images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rsdet_compress.compress.apply import apply_policy
from rsdet_compress.compress.calibration import accumulate_gradients, calibrate, calibration_set, check_calib_images
from rsdet_compress.compress.importance import importance_scores
from rsdet_compress.compress.policy import Policy, fingerprint, resolve
from rsdet_compress.compress.rounding import round_policy
from rsdet_compress.compress.view import CompressibleView
from rsdet_compress.data.evalset import EvalSet
from rsdet_compress.detectors.checkpoint import load_float_detector, save_detector
from rsdet_compress.errors import UserError


@dataclass
class Workspace:
    """A float detector ready to be compressed many times (one view, one ranking per criterion)."""

    view: CompressibleView
    meta: dict
    weights_fp: str
    _scores: dict
    #: labelled training chips for the Taylor criterion (gradients of the detection loss)
    grad_set: EvalSet | None = None

    @classmethod
    def from_weights(cls, weights: str | Path, imgsz: int | None = None,
                     unprunable: list[str] | None = None) -> Workspace:
        """``unprunable``: regex patterns of conv layers whose output channels stay whole (see the view)."""
        model, meta = load_float_detector(weights)  # a compressed checkpoint is refused
        fp = fingerprint(model)  # before the view rewrites blocks (same weights, other names)
        view = CompressibleView(model, imgsz=int(imgsz or meta.get("imgsz") or 640), unprunable=unprunable)
        return cls(view, meta, fp, {})

    def scores(self, criterion: str) -> dict[str, torch.Tensor]:
        """Channel ranking per group by ``criterion``, computed once per workspace."""
        if criterion not in self._scores:
            if criterion == "taylor":
                if self.grad_set is None:
                    raise UserError("criterion 'taylor' ranks channels by loss gradients: "
                                    "give a dataset (--data) to compute them on training chips")
                accumulate_gradients(self.view.model, self.grad_set)
            self._scores[criterion] = importance_scores(self.view, criterion)
            if criterion == "taylor":
                self.view.model.zero_grad(set_to_none=True)
        return self._scores[criterion]

    def resolve(self, policy: Policy, source: str = "policy") -> Policy:
        """Validate ``policy`` for these weights and turn keep ratios into channel lists."""
        policy.validate(self.view, self.weights_fp, source=source)
        needs = any("keep" in g for g in policy.groups.values())
        resolved = resolve(policy, self.view, self.scores(policy.criterion) if needs else None)
        resolved.weights = self.weights_fp
        return resolved

    def apply(self, policy: Policy, calib: EvalSet | None = None, bn: bool | None = None,
              share_weights: bool = True) -> nn.Module:
        """Compressed model for a (validated) policy; calibrated on ``calib`` when given.

        ``bn=None`` recalibrates BatchNorm statistics only when the policy prunes
        channels or skips blocks. Measured on the trained detectors, re-estimating
        them after quantization alone costs mAP (w8a8: -0.5 mAP50 points; w4a4:
        -6), while after pruning it is what keeps the detector alive (30% pruned:
        0.0 -> 0.12 mAP50); see benchmarks/results/compress_baselines.md.
        """
        resolved = policy if all("keep_idx" in g for g in policy.groups.values()) else self.resolve(policy)
        model = apply_policy(self.view, resolved, share_weights=share_weights)
        model.names = self.view.model.names
        if calib is not None:
            calibrate(model, calib, bn=resolved.changes_structure(self.view) if bn is None else bn)
        return model.eval()


def compress(weights: str | Path, policy: str | Path | Policy, out: str | Path, data: str | Path | None = None,
             calib_images: int = 64, round8: bool = False) -> dict:
    """Write the compressed checkpoint ``out`` for ``weights`` under ``policy``.

    With ``data`` (dataset YAML), BN statistics and activation ranges are
    calibrated on ``calib_images`` training chips; without it activations
    stay unquantized until calibrated (a warning says so). ``round8`` rounds
    kept channel counts up to multiples of 8 first (see ``compress.rounding``),
    so a later fine-tune trains the structure that gets deployed.
    """
    if Path(out).is_dir():  # refused again by the atomic writer, but only after the whole compression
        raise UserError(f"{out}: is a folder; give the compressed checkpoint's file name")
    if data:
        check_calib_images(calib_images)
    ws = Workspace.from_weights(weights)
    pol = policy if isinstance(policy, Policy) else Policy.load(policy)
    calib = calibration_set(str(data), ws.view.imgsz, calib_images) if data else None
    ws.grad_set = calib
    resolved = ws.resolve(pol, source=str(policy) if not isinstance(policy, Policy) else "policy")
    rounding = None
    if round8:
        resolved, rounding = round_policy(ws, resolved)
    model = ws.apply(resolved, calib, share_weights=False)
    meta = {**{k: v for k, v in ws.meta.items() if k not in ("detector", "num_classes", "names", "compressed")},
            "float_weights": str(weights), "float_fingerprint": ws.weights_fp, "calibrated": calib is not None,
            **({"round8": rounding} if rounding else {})}
    save_detector(model, out, meta)
    return {"out": str(out), "policy": resolved, "model": model, "workspace": ws, "round8": rounding}
