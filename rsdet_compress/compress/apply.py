"""Apply a resolved policy: skip blocks, physically remove pruned channels, fake-quantize the rest.

Fast by construction (the search applies a policy per candidate): the float
model is copied with its Parameters shared (pruning builds new, smaller
tensors; untouched layers keep pointing at the float weights), and channel
removal follows the per-group plans the view precomputed with torch-pruning,
so there is no graph tracing here. ``share_weights=False`` gives an
independent model for fine-tuning.
"""
from __future__ import annotations

import copy

from torch import nn

from rsdet_compress.compress.policy import Policy
from rsdet_compress.compress.quant import FLOAT_BITS, QConv2d
from rsdet_compress.compress.view import CompressibleView
from rsdet_compress.errors import UserError


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def _copy(model: nn.Module, share_weights: bool) -> nn.Module:
    """Deep copy; with ``share_weights`` Parameters are shared (buffers are still copied)."""
    memo = {id(p): p for p in model.parameters()} if share_weights else {}
    return copy.deepcopy(model, memo)


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def prune_model(view: CompressibleView, policy: Policy, share_weights: bool = True) -> nn.Module:
    """Copy of the view's float model with skipped blocks and pruned channels physically removed."""
    model = _copy(view.model, share_weights)
    skipped = policy.skipped
    for name in skipped:
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, nn.Identity())  # x + f(x) with f removed is x
    # A tensor dimension can follow several groups (a concat's consumer takes input channels from
    # each branch): gather every group's indices, all in the float model's numbering, and cut each
    # (module, dimension) once.
    cuts: dict[tuple[str, object], set[int]] = {}
    for gname, spec in policy.groups.items():
        if "keep_idx" not in spec:
            raise ValueError(f"group {gname}: resolve the policy (keep ratio -> keep_idx) before applying it")
        group = view.groups[gname]
        pruned = set(range(group.size)) - set(spec["keep_idx"])
        if not pruned:
            continue
        for module_name, handler, pairs in group.plan:
            if not _inside(module_name, skipped):
                cuts.setdefault((module_name, handler), set()).update(i for i, root in pairs if root in pruned)
    for (module_name, handler), idxs in cuts.items():
        if idxs:
            handler(model.get_submodule(module_name), sorted(idxs))
    return model


def quantize_model(model: nn.Module, view: CompressibleView, policy: Policy) -> nn.Module:
    """Swap every quantizable conv that the policy gives fewer than 32 bits for a :class:`QConv2d` (in place)."""
    skipped = policy.skipped
    for name in view.quantizable:
        if _inside(name, skipped):
            continue
        spec = policy.layers.get(name, {})
        wbits = spec.get("weight_bits", policy.default_weight_bits)
        abits = spec.get("act_bits", policy.default_act_bits)
        conv = model.get_submodule(name)
        if isinstance(wbits, list) and len(wbits) != conv.out_channels:
            raise UserError(f"layer {name}: {len(wbits)} weight bit-widths for {conv.out_channels} kept channels")
        if min(wbits if isinstance(wbits, list) else [wbits]) >= FLOAT_BITS and abits >= FLOAT_BITS:
            continue  # all float: keep the plain conv
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, QConv2d.from_conv(conv, wbits, abits))
    return model


def apply_policy(view: CompressibleView, policy: Policy, share_weights: bool = True) -> nn.Module:
    """The compressed detector for a resolved ``policy`` (see :func:`rsdet_compress.compress.policy.resolve`).

    Runs forward and backward; BN statistics still describe the float model
    (see :func:`rsdet_compress.compress.calibration.recalibrate_bn`).
    """
    model = quantize_model(prune_model(view, policy, share_weights), view, policy)
    model.detector_name = view.detector
    model.policy = policy
    return model
