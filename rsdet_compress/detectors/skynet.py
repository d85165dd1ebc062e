"""SkyNet (DAC-SDC 2019 winner; Zhang et al., MLSys 2020) with a multi-class ultralytics Detect head.

Backbone as published (reference: TomG008/SkyNet, GPU/models.py): bundles of
3x3 depthwise conv + BN + ReLU6 then 1x1 pointwise conv + BN + ReLU6,
3->48, pool, 48->96, pool, 96->192, pool, 192->384, 384->512; a bypass that
reorganises (space-to-depth, stride 2) the 192-channel map into 768 channels
and concatenates it with the 512-channel map (1280); a 1280->96 bundle. The
original single-object 2-anchor head is replaced by ultralytics' anchor-free
``Detect`` at stride 8, so SkyNet trains, validates and exports through the
same path as YOLO.
"""
from __future__ import annotations

import torch
from torch import nn
from ultralytics.nn.modules import Concat, Detect
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.torch_utils import initialize_weights


class DWPWBundle(nn.Module):
    """SkyNet's bundle: depthwise 3x3 + BN + ReLU6, then pointwise 1x1 + BN + ReLU6."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False)
        self.dw_bn = nn.BatchNorm2d(c_in)
        self.pw = nn.Conv2d(c_in, c_out, 1, 1, 0, bias=False)
        self.pw_bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pw_bn(self.pw(self.act(self.dw_bn(self.dw(x))))))


class Reorg(nn.Module):
    """Space-to-depth by ``stride`` (YOLOv2's reorg): C x H x W -> C*s*s x H/s x W/s.

    ``keep`` lists the output channels kept (all of them unless a compression
    policy pruned some through the concat that follows).
    """

    def __init__(self, channels: int, stride: int = 2):
        super().__init__()
        self.channels = channels
        self.stride = stride
        # not saved: a compressed checkpoint rebuilds it from its policy, float ones never change it
        self.register_buffer("keep", torch.arange(channels * stride * stride), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.pixel_unshuffle(x, self.stride)
        return y if self.keep.numel() == y.shape[1] else y.index_select(1, self.keep)


class SkyNetDetect(Detect):
    """ultralytics Detect pinned to the lightweight (depthwise) classification branch.

    ``Detect.legacy`` is a class attribute that ultralytics' YAML parser flips
    process-wide when it builds a v8 model; pinning it here keeps SkyNet's head
    identical whatever was built before it.
    """

    legacy = False


def _layer(m: nn.Module, i: int, f: int | list[int]) -> nn.Module:
    """Tag a module with the attributes ultralytics' forward loop reads (from, index, type)."""
    m.i, m.f, m.type, m.np = i, f, type(m).__name__, sum(p.numel() for p in m.parameters())
    return m


# (module factory, from) in order; indices are the layer numbers used by ``from``.
_WIDTHS = (48, 96, 192, 384, 512, 96)


class SkyNet(DetectionModel):
    """SkyNet as an ultralytics ``DetectionModel``: same loss, trainer, validator and export.

    ``width`` scales every channel count (1.0 = the published network).
    """

    #: the reorg bypass source: each of its channels feeds 4 reorg outputs, so it is never pruned.
    unprunable_layers = ("model.4.pw",)

    def __init__(self, nc: int = 1, ch: int = 3, width: float = 1.0, verbose: bool = False):
        nn.Module.__init__(self)  # DetectionModel.__init__ would parse a YAML; we build the layers here
        c1, c2, c3, c4, c5, c6 = (max(8, int(round(c * width / 8)) * 8) for c in _WIDTHS)
        layers = [
            (DWPWBundle(ch, c1), -1),           # 0
            (nn.MaxPool2d(2, 2), -1),           # 1  stride 2
            (DWPWBundle(c1, c2), -1),           # 2
            (nn.MaxPool2d(2, 2), -1),           # 3  stride 4
            (DWPWBundle(c2, c3), -1),           # 4  bypass source
            (nn.MaxPool2d(2, 2), -1),           # 5  stride 8
            (DWPWBundle(c3, c4), -1),           # 6
            (DWPWBundle(c4, c5), -1),           # 7
            (Reorg(c3, 2), 4),                  # 8  c3*4 channels at stride 8
            (Concat(1), [8, 7]),                # 9  c3*4 + c5
            (DWPWBundle(c3 * 4 + c5, c6), -1),  # 10
            (SkyNetDetect(nc=nc, ch=(c6,)), [10]),  # 11
        ]
        self.model = nn.Sequential(*(_layer(m, i, f) for i, (m, f) in enumerate(layers)))
        self.save = [4, 7, 8, 10]
        self.yaml = {"nc": nc, "channels": ch, "width": width, "arch": "skynet"}
        self.names = {i: str(i) for i in range(nc)}
        self.inplace = True
        head = self.model[-1]
        head.stride = torch.tensor([8.0])
        self.stride = head.stride
        head.bias_init()
        initialize_weights(self)
        if verbose:
            self.info()
