"""Measured latency of single conv layers on this machine's CPU runtime, cached on disk (HAQ's lookup table).

A key is one conv as the compressed detector runs it: input channels, output channels,
kernel, stride, groups, input height and width, and whether it runs in int8 (a quantized
layer: weights <= 8 bits and 8-bit activations) or fp32. Its value is the median
milliseconds of ``Conv (+ bias) -> SiLU`` at batch 1 on the runtime (onnxruntime or
OpenVINO's CPU plugin) with the given threads, int8 as our exports run it (QDQ from
onnxruntime's static quantizer: per-channel int8 weights on 7 bits, uint8 activations;
OpenVINO runs the same QDQ graph as int8).

Each table lives in one JSON file per machine, runtime (and version) and thread count
(:func:`table_path`), so a measurement is taken once and reused by every later search;
a new key is measured when first asked for (about a second) and the file rewritten
atomically. The same file keeps whole-model timings (:meth:`LatencyTable.model_ms`: the
anchors a prediction is fitted to), under keys their caller names. The numbers only mean
something on the machine that measured them, idle.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rsdet_compress.atomic import write_json
from rsdet_compress.errors import UserError
from rsdet_compress.machine import cpu_label
from rsdet_compress.runtime.openvino import compile_config, require_openvino
from rsdet_compress.settings import runs_root

#: runtimes a latency table can be measured on
RUNTIMES = ("onnxruntime", "openvino")


@dataclass(frozen=True)
class ConvShape:
    """One conv layer as deployed: what its latency depends on."""

    in_c: int
    out_c: int
    kernel: int
    stride: int
    groups: int
    h: int
    w: int
    int8: bool

    @property
    def key(self) -> str:
        return "x".join(str(int(v)) for v in astuple(self))


def _runtime_version(runtime: str) -> str:
    if runtime == "openvino":
        return require_openvino().__version__
    import onnxruntime
    return onnxruntime.__version__


def table_path(runtime: str, threads: int) -> Path:
    """``$RSDET_RUNS/latency/<runtime>-t<threads>-<machine hash>.json``."""
    machine = f"{cpu_label()}|{os.cpu_count()}|{runtime} {_runtime_version(runtime)}"
    digest = hashlib.sha1(machine.encode()).hexdigest()[:10]
    return runs_root() / "latency" / f"{runtime}-t{threads}-{digest}.json"


def _conv_onnx(shape: ConvShape, path: Path) -> None:
    """``Conv -> SiLU`` of ``shape`` as ONNX (int8: QDQ by onnxruntime's static quantizer) at ``path``."""
    conv = nn.Sequential(nn.Conv2d(shape.in_c, shape.out_c, shape.kernel, shape.stride, shape.kernel // 2,
                                   groups=shape.groups), nn.SiLU()).eval()
    x = torch.rand(1, shape.in_c, shape.h, shape.w)
    fp32 = path.with_suffix(".fp32.onnx") if shape.int8 else path
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(conv, (x,), str(fp32), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"])
    if shape.int8:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.left = [{"x": torch.rand(1, shape.in_c, shape.h, shape.w).numpy()} for _ in range(2)]

            def get_next(self):
                return self.left.pop() if self.left else None

        quantize_static(str(fp32), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True)


class LatencyTable:
    """``table(ConvShape) -> ms``: measured once per machine / runtime / threads, then read from disk."""

    def __init__(self, runtime: str = "onnxruntime", threads: int | None = None, runs: int = 20,
                 path: str | Path | None = None) -> None:
        if runtime not in RUNTIMES:
            raise UserError(f"unknown latency runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
        self.runtime, self.threads, self.runs = runtime, int(threads or torch.get_num_threads()), runs
        self.path = Path(path) if path else table_path(runtime, self.threads)
        self.entries: dict[str, float] = {}
        self.models: dict[str, float] = {}  # whole models (the anchors of search.latency_cost), by caller's key
        self.measured = 0  # keys measured by this object (not read from the file)
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self.entries = {k: float(v) for k, v in data["entries"].items()}
                self.models = {k: float(v) for k, v in data.get("models", {}).items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f"{self.path}: not a latency table (delete it to measure again)") from None

    def __call__(self, shape: ConvShape) -> float:
        if shape.key not in self.entries:
            self.entries[shape.key] = self.measure(shape)
            self.measured += 1
            self.save()
        return self.entries[shape.key]

    def model_ms(self, key: str, measure: Callable[[], float]) -> float:
        """A whole model's measured ms under ``key``: ``measure()`` once, then read from the same file."""
        if key not in self.models:
            self.models[key] = float(measure())
            self.measured += 1
            self.save()
        return self.models[key]

    def forget_models(self, prefix: str) -> None:
        """Drop the whole-model timings whose key starts with ``prefix``: the next ``model_ms`` times them again."""
        self.models = {k: v for k, v in self.models.items() if not k.startswith(prefix)}

    def save(self) -> None:
        write_json(self.path, {"runtime": self.runtime, "threads": self.threads, "cpu": cpu_label(),
                               "runtime_version": _runtime_version(self.runtime), "runs": self.runs,
                               "entries": self.entries, "models": self.models})

    def _runner(self, model_path: Path, shape: ConvShape):
        x = np.random.default_rng(0).random((1, shape.in_c, shape.h, shape.w), dtype=np.float32)
        if self.runtime == "openvino":
            ov = require_openvino()
            req = ov.Core().compile_model(ov.convert_model(str(model_path)), "CPU",
                                          compile_config(self.threads)).create_infer_request()
            return lambda: req.infer({0: x})
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, {"x": x})

    def measure(self, shape: ConvShape) -> float:
        """Median ms of ``runs`` batch-1 calls after 3 warm-up calls."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "conv.onnx"
            _conv_onnx(shape, path)
            run = self._runner(path, shape)
            for _ in range(3):
                run()
            times = []
            for _ in range(self.runs):
                t0 = time.perf_counter()
                run()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
