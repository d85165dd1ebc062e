"""Box decoding outside the exported graph: the Detect head's DFL + distance-to-box + sigmoid, vectorised.

An artifact exported with ``decode="host"`` ends at the head's convs: one raw tensor
(B, 4 * reg_max + nc, anchors), the per-level maps flattened and concatenated as
ultralytics' ``Detect.forward_head`` does. Inside the graph the decoding is a softmax
over a non-last axis, reshapes, a 1x1 conv and elementwise ops that int8 CPU runtimes
run in fp32 around re-quantizations (5 ms of YOLOv8n's 17.5 ms int8 onnxruntime latency on
our CPU). Here it is one last-axis softmax and a dot product in torch, on anchors built
for the input's size, giving what ``Detect._inference`` returns: (B, 4 + nc, anchors),
xywh boxes in input pixels and class probabilities.

The artifact's metadata says how (:func:`decode_meta`): ``decode: "host"``, ``reg_max``,
``strides`` (one per level).
"""
from __future__ import annotations

import torch
from ultralytics.utils.tal import dist2bbox, make_anchors

from rsdet_compress.errors import UserError

#: where an exported graph's box decoding happens
DECODES = ("graph", "host")


def decode_meta(head) -> dict:
    """The metadata a host decoder needs from an ultralytics ``Detect`` head."""
    return {"decode": "host", "reg_max": int(head.reg_max), "strides": [float(s) for s in head.stride.tolist()]}


class HostDecoder:
    """``raw (B, 4*reg_max + nc, A), input (H, W) -> decoded (B, 4 + nc, A)``; anchors cached per input size."""

    def __init__(self, reg_max: int, strides: list[float]) -> None:
        self.reg_max = int(reg_max)
        self.strides = [float(s) for s in strides]
        self.bins = torch.arange(self.reg_max, dtype=torch.float32)
        self._anchors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_meta(cls, meta: dict) -> HostDecoder | None:
        """The decoder an artifact's metadata asks for, or None when its graph decodes itself."""
        if meta.get("decode", "graph") == "graph":
            return None
        if meta.get("decode") != "host" or not meta.get("reg_max") or not meta.get("strides"):
            raise UserError(f"artifact metadata: unknown box decoding {meta.get('decode')!r} "
                            f"(this rsdet-compress knows {', '.join(DECODES)})")
        return cls(meta["reg_max"], meta["strides"])

    def anchors(self, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchor points (2, A), strides (1, A)) for an input of size ``hw``, as ``make_anchors`` builds them."""
        if hw not in self._anchors:
            h, w = hw
            feats = [torch.empty(1, 1, -(-h // int(s)), -(-w // int(s))) for s in self.strides]
            points, strides = make_anchors(feats, torch.tensor(self.strides), 0.5)
            self._anchors[hw] = (points.transpose(0, 1), strides.transpose(0, 1))
        return self._anchors[hw]

    def __call__(self, raw: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        points, strides = self.anchors(hw)
        if raw.shape[-1] != points.shape[-1]:
            raise UserError(f"raw head output has {raw.shape[-1]} anchors, an input of {hw[0]}x{hw[1]} at strides "
                            f"{self.strides} has {points.shape[-1]}")
        b, _, a = raw.shape
        box = raw[:, :4 * self.reg_max].reshape(b, 4, self.reg_max, a).transpose(2, 3)  # softmax on the last axis
        dist = box.softmax(-1) @ self.bins.to(raw.dtype)  # (B, 4, A): expected distance, as the DFL conv computes
        xywh = dist2bbox(dist, points.unsqueeze(0), xywh=True, dim=1) * strides
        return torch.cat((xywh, raw[:, 4 * self.reg_max:].sigmoid()), 1)
