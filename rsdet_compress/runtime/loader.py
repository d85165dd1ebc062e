"""Run any of our artifacts like the PyTorch detector: checkpoints, ONNX, OpenVINO IR and packed files.

:class:`OnnxDetector` wraps an onnxruntime session in an ``nn.Module`` so the
:class:`~rsdet_compress.engine.evaluator.Evaluator` and the predictor use it
unchanged: it takes a float tensor (B, 3, H, W) in 0..1 and returns the
decoded Detect output (B, 4 + nc, anchors) on the input's device.
:func:`load_model` picks the loader from the file itself.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rsdet_compress.errors import UserError
from rsdet_compress.runtime.checkpoint import load_detector
from rsdet_compress.runtime.decode import HostDecoder
from rsdet_compress.runtime.onnx_meta import META_KEY, read_meta
from rsdet_compress.runtime.openvino import OV_SUFFIX, OpenVinoDetector
from rsdet_compress.runtime.packed import MAGIC, load_packed

ONNX_SUFFIX = ".onnx"


def _providers() -> list[str]:
    """CUDA when this onnxruntime build has it, CPU always as the fallback."""
    import onnxruntime as ort  # only needed to run an ONNX file: kept out of the CLI's start-up
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxDetector(nn.Module):
    """An rsdet-compress ONNX file behind the eval-mode interface of the PyTorch detector.

    Holds one empty float32 parameter so that ``next(model.parameters())``
    (device and input dtype, as the evaluator and predictor ask) works; ``.to()``
    moves only that, the session stays where onnxruntime put it.
    """

    def __init__(self, path: str | Path, threads: int | None = None,
                 providers: list[str] | None = None, profile: str | None = None) -> None:
        """``profile``: a file prefix; onnxruntime then records every node's time (``session.end_profiling``)."""
        super().__init__()
        # onnx and onnxruntime are only needed to run an ONNX file: kept out of the CLI's start-up
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: ONNX file not found")
        try:
            proto = onnx.load(str(self.path), load_external_data=False)
        except Exception as e:  # not protobuf at all, truncated...
            raise UserError(f"{self.path}: not a readable ONNX file ({type(e).__name__})") from None
        meta = read_meta(proto)
        if meta is None:
            raise UserError(f"{self.path}: not an rsdet-compress ONNX file (no '{META_KEY}' metadata)")
        del proto
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.log_severity_level = 3
        if profile:
            opts.enable_profiling, opts.profile_file_prefix = True, profile
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers or _providers())
        except Exception as e:
            raise UserError(f"{self.path}: onnxruntime cannot load it ({str(e).splitlines()[0][:120]})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.meta = meta
        #: box decoding outside the graph (``decode: host`` files), else None
        self.decoder = HostDecoder.from_meta(meta)
        self.names = dict(enumerate(meta.get("names") or []))
        self.detector_name = meta.get("detector")
        self.stride = torch.tensor([float(meta.get("stride") or 32)])
        self._device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded predictions (B, 4 + nc, anchors) for a float batch (B, 3, H, W), on ``x``'s device."""
        arr = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        y = torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])
        if self.decoder is not None:
            y = self.decoder(y, tuple(arr.shape[2:]))
        return y.to(x.device)

    def extra_repr(self) -> str:
        return f"{self.path.name}, {self.meta.get('precision')}, providers={self.session.get_providers()}"


def _is_packed(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Load any artifact -> (model in eval mode, metadata).

    ``.onnx`` -> :class:`OnnxDetector` and ``.xml`` -> :class:`OpenVinoDetector` (only
    files we wrote: our metadata marker is required; ``meta["runtime"]`` names the
    runtime); a packed deploy file (by its magic bytes) -> ``load_packed``;
    anything else -> ``load_detector`` (our checkpoints, float or compressed, and
    ultralytics ``.pt``).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model file not found")
    if path.suffix.lower() == ONNX_SUFFIX:
        model = OnnxDetector(path)
        meta = {k: v for k, v in model.meta.items() if k not in ("format", "version")}
        return model.eval(), {**meta, "onnx": True, "runtime": "onnxruntime"}
    if path.suffix.lower() == OV_SUFFIX:
        model = OpenVinoDetector(path)
        meta = {k: v for k, v in model.meta.items() if k not in ("format", "version")}
        return model.eval(), {**meta, "runtime": "openvino"}
    if _is_packed(path):
        return load_packed(path)
    return load_detector(path)
