"""Channel importance per group, by one named criterion (torch-pruning's Importance classes).

One criterion ranks channels everywhere: which channels a keep ratio keeps,
and (in the search) which kept channels get more bits.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rsdet_compress.errors import UserError

if TYPE_CHECKING:
    import torch

#: the criterion registry: name -> torch-pruning Importance factory (normalizer=None: raw scores; only their
#: order inside a group matters here). torch_pruning is imported on use, so the names are cheap to read
#: (policy validation, CLI help).
CRITERIA: dict[str, Callable[[], Any]] = {
    "l1": lambda: _tp().importance.GroupMagnitudeImportance(p=1, normalizer=None),
    "l2": lambda: _tp().importance.GroupMagnitudeImportance(p=2, normalizer=None),
    "bn_scale": lambda: _tp().importance.BNScaleImportance(normalizer=None),
    "taylor": lambda: _tp().importance.GroupTaylorImportance(normalizer=None),
}
DEFAULT_CRITERION = "l1"


def _tp():
    import torch_pruning as tp
    return tp


def _criterion(name: str):
    if name not in CRITERIA:
        raise UserError(f"unknown importance criterion {name!r}; choose one of {', '.join(CRITERIA)}")
    return CRITERIA[name]()


def importance_scores(view, criterion: str = DEFAULT_CRITERION) -> dict[str, torch.Tensor]:
    """Group name -> one score per group channel (higher = more important), on the view's float model.

    "taylor" needs gradients on the model's weights (run a loss backward first,
    e.g. :func:`rsdet_compress.compress.calibration.accumulate_gradients`).
    """
    import torch
    import torch_pruning as tp
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
                s = _criterion(DEFAULT_CRITERION)(group)
            scores[name] = s.detach().float().cpu()
    return scores
