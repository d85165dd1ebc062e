"""Latency as a search budget: a policy's analytic cost plus its latency predicted from measured conv layers.

``LatencyCost(view, table, float_ms)`` is a drop-in for :func:`~rsdet_compress.compress.cost.estimate`:
it returns the same :class:`Cost` with ``latency_ms`` set and ``per_layer[name]["latency_ms"]``
filled from the :class:`~rsdet_compress.runtime.latency_table.LatencyTable` (each kept conv
shape, int8 where the policy quantizes it). Everything that is not a conv (concat, upsample,
pooling, box decoding, the runtime's own per-call work) is one constant, ``rest_ms``: the
float model's measured latency minus its convs' table entries. Where the isolated convs add
up to more than the whole model (the runtime fuses and overlaps what a one-conv graph cannot),
the table entries are scaled down by ``scale`` instead, so the float model's prediction is its
measured latency either way and no prediction goes negative. A ``latency=0.33`` budget is
then a third of the float model's measured latency, and the search ranks policies by what
they cost on this machine's runtime instead of by FLOPs (which put two YOLOv8n policies in
the wrong latency order).

:func:`measure_model_ms` times a whole detector exported for the runtime (the float model
once per search; a compressed one to check the prediction).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from rsdet_compress.compress.cost import Cost, estimate
from rsdet_compress.compress.policy import Policy
from rsdet_compress.compress.quant import FLOAT_BITS
from rsdet_compress.engine.latency import summarize, time_fn
from rsdet_compress.export.onnx import export_module, quantize_int8
from rsdet_compress.export.openvino import export_openvino
from rsdet_compress.runtime.latency_table import ConvShape, LatencyTable
from rsdet_compress.runtime.loader import OnnxDetector
from rsdet_compress.runtime.openvino import OpenVinoDetector


def layer_shapes(view, cost: Cost) -> dict[str, ConvShape]:
    """Each conv of ``cost.per_layer`` as deployed: kept channels, and int8 where weights <= 8 and acts 8 bits."""
    shapes = {}
    for name, p in cost.per_layer.items():
        info = view.layers[name]
        if not p["out_channels"]:
            continue
        int8 = p["mean_weight_bits"] < FLOAT_BITS and p["act_bits"] <= 8
        shapes[name] = ConvShape(p["in_channels"], p["out_channels"], info.kernel[0], info.stride, p["groups"],
                                 info.in_hw[0], info.in_hw[1], int8)
    return shapes


def measure_model_ms(model: nn.Module, meta: dict, imgsz: int, runtime: str, threads: int, runs: int = 20,
                     calib_batches: list | None = None) -> float:
    """Median batch-1 ms of ``model`` exported for ``runtime`` (int8 QDQ when ``calib_batches`` are given)."""
    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        if runtime == "openvino":
            path = export_openvino(model, meta, Path(tmp) / "m.xml", imgsz, calib_batches,
                                   quantizer="onnxruntime")
            det = OpenVinoDetector(path, threads=threads)
        else:
            path = export_module(model, meta, Path(tmp) / "m.onnx", imgsz)
            if calib_batches is not None:
                path = quantize_int8(path, Path(tmp) / "q.onnx", calib_batches)
            det = OnnxDetector(path, threads=threads)
        return summarize(time_fn(lambda: det(x), runs, warmup=3), 1)["median_ms"]


class LatencyCost:
    """``estimate``-compatible: the analytic cost plus predicted latency (see the module docstring)."""

    def __init__(self, view, table: LatencyTable, float_ms: float) -> None:
        self.view, self.table, self.float_ms = view, table, float(float_ms)
        convs = sum(table(s) for s in layer_shapes(view, estimate(view)).values())
        self.rest_ms = max(0.0, self.float_ms - convs)
        self.scale = min(1.0, self.float_ms / convs) if convs > 0 else 1.0

    def __call__(self, view, policy: Policy | None = None, per_layer: bool = True) -> Cost:
        cost = estimate(view, policy)  # the per-layer shapes are what the latency is looked up by
        total = self.rest_ms
        for name, shape in layer_shapes(view, cost).items():
            ms = self.scale * self.table(shape)
            cost.per_layer[name]["latency_ms"] = ms
            total += ms
        cost.latency_ms = total
        return cost
