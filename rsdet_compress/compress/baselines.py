"""Baseline policies, one function each, so every search compares on equal terms.

- uniform n-bit weights (and activations) on every quantizable layer;
- uniform magnitude pruning at ratio r (every prunable group keeps 1 - r, ranked by the criterion);
- two-stage: prune at r, then uniform n-bit.
"""
from __future__ import annotations

from rsdet_compress.compress.importance import DEFAULT_CRITERION
from rsdet_compress.compress.policy import Policy


def uniform_bits(view, bits: int, act_bits: int | None = None, criterion: str = DEFAULT_CRITERION) -> Policy:
    """Every quantizable conv at ``bits`` per weight (32 = float) and ``act_bits`` per activation."""
    return Policy(detector=view.detector, imgsz=view.imgsz, criterion=criterion,
                  default_weight_bits=bits, default_act_bits=act_bits if act_bits is not None else bits)


def magnitude_pruning(view, ratio: float, criterion: str = DEFAULT_CRITERION) -> Policy:
    """Remove the ``ratio`` least important channels of every prunable group (float weights)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    groups = {name: {"keep": 1.0 - ratio} for name in view.groups} if ratio > 0 else {}
    return Policy(detector=view.detector, imgsz=view.imgsz, criterion=criterion, groups=groups)


def two_stage(view, ratio: float, bits: int, act_bits: int | None = None, criterion: str = DEFAULT_CRITERION) -> Policy:
    """Prune at ``ratio``, then quantize what is left uniformly at ``bits``."""
    p = magnitude_pruning(view, ratio, criterion)
    p.default_weight_bits = bits
    p.default_act_bits = act_bits if act_bits is not None else bits
    return p
