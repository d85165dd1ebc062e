"""OpenVINO IR artifacts (``.xml`` + ``.bin``) run like the PyTorch detector, on OpenVINO's CPU plugin.

:class:`OpenVinoDetector` is the OpenVINO twin of
:class:`~rsdet_compress.runtime.loader.OnnxDetector`: float (B, 3, H, W) in 0..1
in, the decoded Detect output (B, 4 + nc, anchors) out. The IR keeps a dynamic
batch and size (the predictor slices scenes into any size); OpenVINO's CPU kernels
are fastest on static shapes, so each input shape gets its own compiled model,
reshaped from the IR and kept for the next call (a deployment runs one shape).

OpenVINO is an optional dependency (``pip install 'rsdet-compress[openvino]'``):
:func:`require_openvino` turns its absence into one line, raised before any work.
Our metadata (the ONNX export's JSON, :mod:`rsdet_compress.runtime.onnx_meta`) is
stored in the IR's runtime info under :data:`META_KEY`; only files that have it load.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rsdet_compress.errors import UserError
from rsdet_compress.runtime.decode import HostDecoder
from rsdet_compress.runtime.onnx_meta import FORMAT, META_KEY

#: file suffix of an OpenVINO IR's entry point (its weights are the ``.bin`` beside it)
OV_SUFFIX = ".xml"
#: compiled shapes kept per detector: evaluation uses two (full and last batch), a deployment one
MAX_SHAPES = 4


def require_openvino():
    """The ``openvino`` module, or one line saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise UserError("OpenVINO is not installed: pip install 'rsdet-compress[openvino]' "
                        "(or pip install openvino nncf)") from None
    return openvino


def bin_path(xml: str | Path) -> Path:
    """The weights file OpenVINO reads beside ``xml``."""
    return Path(xml).with_suffix(".bin")


def read_ov_meta(model) -> dict | None:
    """Our metadata of an ``openvino.Model``, or None if it is not ours."""
    if not model.has_rt_info([META_KEY]):
        return None
    try:
        data = json.loads(model.get_rt_info([META_KEY]).astype(str))
    except (json.JSONDecodeError, RuntimeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def compile_config(threads: int | None) -> dict:
    """CPU plugin settings: latency hint (one stream, all threads on one request), exact fp32 where float.

    ``INFERENCE_PRECISION_HINT=f32`` keeps float layers in fp32 on CPUs with bf16/AMX, where the
    plugin would otherwise run them in bf16 and the mAP check would test another model.
    """
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
            "INFERENCE_PRECISION_HINT": "f32"}


class OpenVinoDetector(nn.Module):
    """An rsdet-compress OpenVINO IR behind the eval-mode interface of the PyTorch detector.

    Like ``OnnxDetector`` it holds one empty parameter so ``next(model.parameters())``
    answers device and dtype; inference always runs on the CPU plugin.
    """

    def __init__(self, path: str | Path, threads: int | None = None, profile: bool = False) -> None:
        """``profile``: the CPU plugin records every node's time (``request(shape).get_profiling_info()``)."""
        super().__init__()
        ov = require_openvino()
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: OpenVINO IR not found")
        if not bin_path(self.path).is_file():
            raise UserError(f"{self.path}: its weights file {bin_path(self.path).name} is missing beside it")
        with open(self.path, "rb") as f:  # OpenVINO would try every frontend on it and print their parse errors
            if b"<net" not in f.read(4096):
                raise UserError(f"{self.path}: not an OpenVINO IR (no <net> element)")
        self.core = ov.Core()
        try:
            self.ir = self.core.read_model(str(self.path))
        except Exception as e:  # not XML, truncated .bin, another tool's IR version...
            raise UserError(f"{self.path}: OpenVINO cannot read it ({str(e).splitlines()[0][:120]})") from None
        meta = read_ov_meta(self.ir)
        if meta is None:
            raise UserError(f"{self.path}: not an rsdet-compress OpenVINO IR (no '{META_KEY}' runtime info)")
        self.meta = meta
        self.config = {**compile_config(threads), **({"PERF_COUNT": True} if profile else {})}
        #: box decoding outside the graph (``decode: host`` files), else None
        self.decoder = HostDecoder.from_meta(meta)
        self.names = dict(enumerate(meta.get("names") or []))
        self.detector_name = meta.get("detector")
        self.stride = torch.tensor([float(meta.get("stride") or 32)])
        self._compiled: dict[tuple[int, ...], object] = {}
        self._device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def request(self, shape: tuple[int, ...]):
        """An infer request of the IR compiled for the static input ``shape`` (cached)."""
        if shape not in self._compiled:
            if len(self._compiled) >= MAX_SHAPES:
                self._compiled.pop(next(iter(self._compiled)))
            model = self.ir.clone()
            model.reshape({model.inputs[0].any_name: list(shape)})
            self._compiled[shape] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        return self._compiled[shape]

    def run(self, arr):
        """Raw inference on a float32 NCHW numpy array -> numpy output."""
        req = self.request(tuple(arr.shape))
        req.infer({0: arr})
        return req.get_output_tensor(0).data.copy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded predictions (B, 4 + nc, anchors) for a float batch (B, 3, H, W), on ``x``'s device."""
        arr = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        y = torch.from_numpy(self.run(arr))
        if self.decoder is not None:
            y = self.decoder(y, tuple(arr.shape[2:]))
        return y.to(x.device)

    def extra_repr(self) -> str:
        return f"{self.path.name}, {self.meta.get('precision')}, openvino CPU"
