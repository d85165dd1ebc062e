"""Loading any of our checkpoints, float or compressed (pruned, fake-quantized), as a model.

A compressed checkpoint stores fp32 weights plus the resolved policy; its
structure (pruned shapes, skipped blocks, quantized convs) is rebuilt from that
policy on the float skeleton before the weights are loaded. Reading the file
itself (safe unpickling, ``--trust-weights``, format checks) and writing it are
:mod:`rsdet_compress.detectors.checkpoint`.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from rsdet_compress.compress.apply import apply_policy
from rsdet_compress.compress.cost import estimate
from rsdet_compress.compress.policy import Policy
from rsdet_compress.compress.view import CompressibleView
from rsdet_compress.detectors.checkpoint import (
    CHECKPOINT_FORMAT,
    from_ultralytics,
    load_state,
    read_checkpoint,
    skeleton,
)
from rsdet_compress.errors import UserError


def load_detector(path: str | Path, trust: bool | None = None) -> tuple[nn.Module, dict]:
    """Load a checkpoint -> (model in eval mode, metadata).

    Our checkpoints, float or compressed, and local ultralytics ``.pt`` files.
    Metadata holds ``detector``, ``num_classes``, ``names``, ``compressed`` and
    whatever the writer stored in ``meta`` (image size, data-set scale, metrics).
    ``trust`` (default: inside ``trusted_weights()`` or not) allows a full unpickle
    of an ultralytics file the restricted loader refuses.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, trust)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        return from_ultralytics(ckpt, path)
    model = skeleton(ckpt)
    if "policy" in ckpt:
        model = rebuild_compressed(model, ckpt["policy"], path)
    return load_state(model, ckpt, path)


def rebuild_compressed(model: nn.Module, policy_dict: dict, path: Path) -> nn.Module:
    """The compressed structure (pruned shapes, skipped blocks, quantized convs) for loading its weights.

    The result carries ``cost`` and ``float_cost`` (:func:`~rsdet_compress.compress.cost.estimate` of
    the policy and of the float ``model`` it was made from), so a loaded compressed model can say
    how much smaller and cheaper it is without its float weights.
    """
    policy = Policy.from_dict(policy_dict, source=str(path))
    if any("keep_idx" not in g for g in policy.groups.values()):
        raise UserError(f"{path}: compressed checkpoint carries an unresolved policy")
    view = CompressibleView(model, imgsz=policy.imgsz)
    compressed = apply_policy(view, policy, share_weights=False)
    compressed.float_cost, compressed.cost = estimate(view, per_layer=False), estimate(view, policy, per_layer=False)
    return compressed
