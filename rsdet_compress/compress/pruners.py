"""torch-pruning handlers for our own layers that its tracer cannot see through.

SkyNet's :class:`Reorg` (space-to-depth) turns C channels into 4C. Registered
as a layer with its own pruner, it becomes a channel boundary: its outputs
(which enter a concat) can be pruned by selecting kept channels, while its
inputs stay whole (SkyNet declares the reorg's source unprunable).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc

from rsdet_compress.detectors.skynet import Reorg


class ReorgPruner(BasePruningFunc):
    """Output channels: drop from ``Reorg.keep``. Input channels: not prunable."""

    def prune_out_channels(self, layer: Reorg, idxs: Sequence[int]) -> nn.Module:
        drop = set(int(i) for i in idxs)
        kept = [k for k in range(layer.keep.numel()) if k not in drop]
        layer.keep = layer.keep[torch.tensor(kept, dtype=torch.long)]
        return layer

    def prune_in_channels(self, layer: Reorg, idxs: Sequence[int]) -> nn.Module:
        raise RuntimeError("Reorg input channels are not prunable (their source is declared unprunable)")

    def get_out_channels(self, layer: Reorg) -> int:
        return int(layer.keep.numel())

    def get_in_channels(self, layer: Reorg) -> int:
        return int(layer.channels)


#: passed to DependencyGraph.build_dependency(customized_pruners=...).
CUSTOM_PRUNERS = {Reorg: ReorgPruner()}
