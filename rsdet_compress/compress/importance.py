"""Channel importance per group, by one named criterion (torch-pruning's Importance classes).

One criterion ranks channels everywhere: which channels a keep ratio keeps,
and (in the search) which kept channels get more bits.
"""
from __future__ import annotations

import torch
import torch_pruning as tp

from rsdet_compress.errors import UserError


def _criterion(name: str) -> tp.importance.Importance:
    # normalizer=None: raw scores; only their order inside a group matters here.
    table = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1, normalizer=None),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2, normalizer=None),
        "bn_scale": lambda: tp.importance.BNScaleImportance(normalizer=None),
        "taylor": lambda: tp.importance.GroupTaylorImportance(normalizer=None),
    }
    if name not in table:
        raise UserError(f"unknown importance criterion {name!r}; choose one of {', '.join(table)}")
    return table[name]()


def importance_scores(view, criterion: str = "l1") -> dict[str, torch.Tensor]:
    """Group name -> one score per group channel (higher = more important), on the view's float model.

    "taylor" needs gradients on the model's weights (run a loss backward first,
    e.g. :func:`rsdet_compress.compress.calibration.accumulate_gradients`).
    """
    imp = _criterion(criterion)
    if criterion == "taylor" and all(p.grad is None for p in view.model.parameters()):
        raise UserError("criterion 'taylor' needs gradients: accumulate a loss on training images first")
    scores = {}
    with torch.no_grad():
        for name, g in view.groups.items():
            root = view.model.get_submodule(g.root)
            group = view.graph.get_pruning_group(root, tp.prune_conv_out_channels, list(range(g.size)))
            s = imp(group)
            if s is None or s.numel() != g.size:  # e.g. bn_scale on a group without BN: fall back to L1
                s = _criterion("l1")(group)
            scores[name] = s.detach().float().cpu()
    return scores
