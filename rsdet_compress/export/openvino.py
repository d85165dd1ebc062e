"""OpenVINO IR export of float and compressed detectors: fp32, and int8 by NNCF post-training quantization.

The IR is converted from the graph the ONNX export writes (:func:`export_module`:
physically pruned convs, weights on the policy's grid baked in as fp32), so both
runtimes run the same network:

* ``openvino``: that graph as it is. A compressed model's calibrated activation
  quantizers are its QDQ nodes, which OpenVINO turns into FakeQuantize and runs in
  int8 where its kernels can: our own ranges and bit-widths.
* ``openvino-int8``: the float graph (weights baked, no activation QDQ) quantized by
  NNCF (``nncf.quantize``: MinMax-style ranges on calibration chips, int8 per-channel
  weights, the ``mixed`` preset: symmetric weights, asymmetric activations), as
  ultralytics' ``export(format="openvino", int8=True)`` does. The box decoding after
  the head's convs stays float (the same nodes ``onnx-int8`` leaves out), and weight
  codes stay within 7 bits unless ``full_range_weights`` (NNCF's overflow fix:
  CPUs without VNNI saturate int16 accumulations, as for onnxruntime).

Our metadata rides in the IR's runtime info (:data:`META_KEY`); the two files
(``.xml`` + ``.bin``) are written into a temporary folder and moved in with the
``.xml`` last, so a finished-looking ``.xml`` always has its own ``.bin``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import onnx
from torch import nn

from rsdet_compress.errors import UserError
from rsdet_compress.export.onnx import DEFAULT_OPSET, FULL_RANGE_WEIGHTS, export_module, post_conv_nodes
from rsdet_compress.runtime.onnx_meta import META_KEY, read_meta
from rsdet_compress.runtime.openvino import bin_path, require_openvino


def require_nncf():
    """The ``nncf`` module, or one line saying how to install it."""
    # importing nncf probes torch's C++ extension toolchain and warns "No CUDA runtime is found" on CPU machines
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import nncf
    except ImportError:
        raise UserError("openvino-int8 needs NNCF: pip install 'rsdet-compress[openvino]' (or pip install nncf)") \
            from None
    return nncf


def float_scope(onnx_model: onnx.ModelProto) -> list[str]:
    """NNCF ignored-scope patterns for the box decoding: every OpenVINO op converted from a post-conv ONNX node.

    OpenVINO keeps an ONNX node's name as its ops' friendly name, or as their prefix
    (``.../Conv`` -> ``.../Conv/WithoutBiases``), hence patterns, not names.
    """
    return [re.escape(name) + "(/.*)?$" for name in post_conv_nodes(onnx_model) if name]


def save_ir(ov_model, out: Path) -> Path:
    """Write ``ov_model`` as ``out`` (.xml) + its .bin: both complete or neither replaced half-way (module doc)."""
    ov = require_openvino()
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as tmp:
        staged = Path(tmp) / out.name
        ov.save_model(ov_model, str(staged), compress_to_fp16=False)
        out.unlink(missing_ok=True)  # no old .xml may ever point at the new .bin
        os.replace(bin_path(staged), bin_path(out))
        os.replace(staged, out)
    return out


def export_openvino(model: nn.Module, meta: dict, out: str | Path, imgsz: int, calib_batches: Iterable | None = None,
                    opset: int = DEFAULT_OPSET, source: str = "",
                    full_range_weights: bool = FULL_RANGE_WEIGHTS, decode: str = "graph") -> Path:
    """Export an in-memory detector to the OpenVINO IR ``out`` (.xml); int8 by NNCF when ``calib_batches`` is given.

    ``calib_batches``: float image batches (B, 3, H, W, 0..1) of training chips, all used. They are
    handed to NNCF one image at a time: its ``subset_size`` counts dataset items, and batched
    items would make it count batches as images.
    """
    ov = require_openvino()
    int8 = calib_batches is not None
    nncf = require_nncf() if int8 else None
    out = Path(out)
    if out.suffix.lower() != ".xml":
        raise UserError(f"{out}: an OpenVINO IR is written as NAME.xml (+ NAME.bin)")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_module(model, meta, onnx_path, imgsz, opset=opset, act_qdq=not int8, source=source, decode=decode)
        proto = onnx.load(str(onnx_path))
        ov_meta = read_meta(proto)
        ov_model = ov.convert_model(str(onnx_path))
    if int8:
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
        images = [x[None] for b in calib_batches for x in b.detach().float().cpu().numpy()]
        if not images:
            raise UserError("openvino-int8 needs calibration images: the calibration set is empty")
        fix = OverflowFix.DISABLE if full_range_weights else OverflowFix.ENABLE
        nncf.set_log_level(logging.WARNING)  # its INFO lines go to stdout, which --json keeps for the report
        with contextlib.redirect_stdout(sys.stderr):  # and so do its progress bars
            ov_model = nncf.quantize(
                ov_model, nncf.Dataset(images), preset=nncf.QuantizationPreset.MIXED, subset_size=len(images),
                ignored_scope=nncf.IgnoredScope(patterns=float_scope(proto), validate=False),
                advanced_parameters=AdvancedQuantizationParameters(overflow_fix=fix))
        ov_meta = {**ov_meta, "precision": "int8", "quantizer": f"nncf {nncf.__version__}",
                   "weight_code_bits": 8 if full_range_weights else 7,
                   "calibration_images": len(images)}
    ov_meta = {**ov_meta, "runtime": "openvino", "openvino": ov.__version__}
    ov_model.set_rt_info(json.dumps(ov_meta), [META_KEY])
    return save_ir(ov_model, out)
