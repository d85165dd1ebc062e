"""How some detector modules are written into an export graph, where their own forward runs slowly or not at all.

* SkyNet's :class:`Reorg` as ONNX ``SpaceToDepth`` + one channel ``Gather`` (for onnxruntime);
* ultralytics' ``Concat`` without inputs a policy pruned to no channels (OpenVINO's ONNX reader
  refuses a zero-channel tensor).
"""
from __future__ import annotations

import types

import torch
from torch import nn
from ultralytics.nn.modules import Concat

from rsdet_compress.detectors.skynet import Reorg


class _SpaceToDepth(torch.autograd.Function):
    """ONNX ``SpaceToDepth`` (blocks-first channel order: block offset outer, channel inner)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: int) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, c, h // s, s, w // s, s).permute(0, 3, 5, 1, 2, 4).reshape(n, c * s * s, h // s, w // s)

    @staticmethod
    def symbolic(g, x, s: int):
        return g.op("SpaceToDepth", x, blocksize_i=s)


def space_to_depth_reorg(self: Reorg, x: torch.Tensor) -> torch.Tensor:
    """``Reorg.forward`` as SpaceToDepth + one channel Gather (pixel_unshuffle's channel c*s*s+k is k*C+c).

    onnxruntime runs pixel_unshuffle's 6-D Transpose element by element: SkyNet at 416 px runs 0.68-0.92x
    the time this way (benchmarks/results/reorg_export_airbus_skynet.md). On OpenVINO the pair is not
    faster everywhere (NNCF int8 of the float SkyNet: 1.22x the time), so its export keeps the Transpose.
    """
    s = self.stride
    return _SpaceToDepth.apply(x, s).index_select(1, (self.keep % (s * s)) * x.shape[1] + self.keep // (s * s))


def _cat_nonempty(self: nn.Module, x: list[torch.Tensor]) -> torch.Tensor:
    """``Concat.forward`` without the inputs a policy pruned to no channels: they leave the graph."""
    return torch.cat([t for t in x if t.shape[self.d]], self.d)


def for_export(m: nn.Module, space_to_depth: bool) -> None:
    """Give ``m`` (in the export copy of a model) its export-graph forward, if it has one."""
    if isinstance(m, Reorg) and space_to_depth:
        m.forward = types.MethodType(space_to_depth_reorg, m)
    if isinstance(m, Concat):
        m.forward = types.MethodType(_cat_nonempty, m)
