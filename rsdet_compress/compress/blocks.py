"""Rewrite ultralytics blocks that split a tensor (``chunk``/``split``) into explicit convs.

torch-pruning's DependencyGraph cannot follow C2f's ``cv1(x).chunk(2, 1)``:
pruning then mis-sizes the following layers. Splitting ``cv1`` into two 1x1
convs (one per half) computes exactly the same function and gives the graph
two plain edges. C3k2 (YOLO11) is a C2f subclass; C2PSA does the same with
``split``. ``make_prunable`` swaps them in place, keeping weights.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from ultralytics.nn.modules import C2PSA, C2f
from ultralytics.nn.modules.conv import Conv

#: attributes ultralytics' forward loop and model info read on top-level layers.
_LAYER_ATTRS = ("i", "f", "type", "np")


def slice_conv(src: Conv, start: int, stop: int) -> Conv:
    """A copy of ultralytics ``Conv`` (conv + BN + act) keeping output channels [start, stop)."""
    out = copy.deepcopy(src)
    conv, bn = out.conv, out.bn
    conv.weight = nn.Parameter(src.conv.weight.detach()[start:stop].clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(src.conv.bias.detach()[start:stop].clone())
    conv.out_channels = stop - start
    bn.weight = nn.Parameter(src.bn.weight.detach()[start:stop].clone())
    bn.bias = nn.Parameter(src.bn.bias.detach()[start:stop].clone())
    bn.running_mean = src.bn.running_mean[start:stop].clone()
    bn.running_var = src.bn.running_var[start:stop].clone()
    bn.num_features = stop - start
    return out


class _SplitCv1(nn.Module):
    """Shared part of the rewrites: ``cv1`` (c1 -> 2c) becomes ``cv1a`` and ``cv1b`` (c1 -> c each)."""

    def __init__(self, src: nn.Module):
        super().__init__()
        self.c = src.c
        self.cv1a = slice_conv(src.cv1, 0, src.c)
        self.cv1b = slice_conv(src.cv1, src.c, 2 * src.c)
        self.cv2 = src.cv2
        self.m = src.m


class C2fExplicit(_SplitCv1):
    """C2f / C3k2 with ``cv1`` as two convs instead of one conv + ``chunk``: same outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1a(x), self.cv1b(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C2PSAExplicit(_SplitCv1):
    """C2PSA with ``cv1`` as two convs instead of one conv + ``split``: same outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(torch.cat((self.cv1a(x), self.m(self.cv1b(x))), 1))


_REWRITES = ((C2f, C2fExplicit), (C2PSA, C2PSAExplicit))


def make_prunable(model: nn.Module) -> int:
    """Replace every C2f/C3k2/C2PSA in ``model`` (in place) by its explicit form; returns the count.

    Idempotent: already rewritten blocks are left alone.
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            for src_type, new_type in _REWRITES:
                if isinstance(child, src_type):
                    new = new_type(child)
                    for attr in _LAYER_ATTRS:
                        if hasattr(child, attr):
                            setattr(new, attr, getattr(child, attr))
                    new.train(child.training)
                    setattr(parent, name, new)
                    count += 1
                    break
    return count
