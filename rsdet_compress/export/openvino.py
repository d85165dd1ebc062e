"""OpenVINO IR export of float and compressed detectors: fp32, and int8 by NNCF post-training quantization.

The IR is converted from the graph the ONNX export writes (:func:`export_module`:
physically pruned convs, weights on the policy's grid baked in as fp32), so both
runtimes run the same network:

* ``openvino``: that graph as it is. A compressed model's calibrated activation
  quantizers are its QDQ nodes, which become FakeQuantize on fp32 weights: the same
  numbers as PyTorch, not int8 kernels (those need quantized weights too: ``openvino-int8``).
* ``openvino-int8``: by default the float graph (weights baked, no activation QDQ) quantized by
  NNCF (``nncf.quantize``: MinMax-style ranges on calibration chips, int8 per-channel
  weights, the ``mixed`` preset: symmetric weights, asymmetric activations), as
  ultralytics' ``export(format="openvino", int8=True)`` does. The box decoding after
  the head's convs stays float (the same nodes ``onnx-int8`` leaves out), and weight
  codes stay within 7 bits unless ``full_range_weights`` (NNCF's overflow fix:
  CPUs without VNNI saturate int16 accumulations, as for onnxruntime). With
  ``quantizer="onnxruntime"`` it is the ``onnx-int8`` QDQ graph converted instead: a
  compressed model's own activation ranges, the rest calibrated by onnxruntime.

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
import torch
from torch import nn

from rsdet_compress.errors import UserError
from rsdet_compress.export.onnx import (
    DEFAULT_OPSET,
    FULL_RANGE_WEIGHTS,
    export_module,
    post_conv_nodes,
    quantize_int8,
)
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


#: who quantizes an ``openvino-int8`` IR: NNCF on the float graph, or onnxruntime (the ``onnx-int8`` QDQ graph,
#: converted: a compressed model's own activation ranges, int8 weights in QDQ, which OpenVINO runs as int8)
OV_QUANTIZERS = ("nncf", "onnxruntime")
#: what onnxruntime quantizes for an OpenVINO IR: the ops OpenVINO runs in int8 (convs, and the concats, pools and
#: resizes between them). Not the Sigmoid and Mul of SiLU: Q/DQ between them keeps OpenVINO from fusing them into
#: the conv as Swish, and the whole-graph QDQ ran 1.4x slower than NNCF's placement (YOLOv8n, 14.3 vs 10.2 ms)
OV_ORT_OP_TYPES = ("Conv", "Concat", "MaxPool", "Resize")


def _nncf_int8(ov_model, proto: onnx.ModelProto, images: list, full_range_weights: bool):
    nncf = require_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    fix = OverflowFix.DISABLE if full_range_weights else OverflowFix.ENABLE
    nncf.set_log_level(logging.WARNING)  # its INFO lines go to stdout, which --json keeps for the report
    with contextlib.redirect_stdout(sys.stderr):  # and so do its progress bars
        return nncf.quantize(
            ov_model, nncf.Dataset(images), preset=nncf.QuantizationPreset.MIXED, subset_size=len(images),
            ignored_scope=nncf.IgnoredScope(patterns=float_scope(proto), validate=False),
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=fix)), f"nncf {nncf.__version__}"


def export_openvino(model: nn.Module, meta: dict, out: str | Path, imgsz: int, calib_batches: Iterable | None = None,
                    opset: int = DEFAULT_OPSET, source: str = "", full_range_weights: bool = FULL_RANGE_WEIGHTS,
                    decode: str = "graph", quantizer: str = "nncf", space_to_depth: bool = False) -> Path:
    """Export an in-memory detector to the OpenVINO IR ``out`` (.xml); int8 when ``calib_batches`` is given.

    ``calib_batches``: float image batches (B, 3, H, W, 0..1) of training chips, all used.
    ``quantizer`` (:data:`OV_QUANTIZERS`): ``nncf`` gets them one image at a time (its
    ``subset_size`` counts dataset items; batched items would count batches as images);
    ``onnxruntime`` calibrates :func:`quantize_int8` with them and converts its QDQ graph.
    ``space_to_depth`` off: OpenVINO runs SkyNet's reorg as a Transpose no slower (export.graph_forms).
    """
    ov = require_openvino()
    if quantizer not in OV_QUANTIZERS:
        raise UserError(f"unknown --ov-quantizer {quantizer!r}; choose one of: {', '.join(OV_QUANTIZERS)}")
    int8 = calib_batches is not None
    out = Path(out)
    if out.suffix.lower() != ".xml":
        raise UserError(f"{out}: an OpenVINO IR is written as NAME.xml (+ NAME.bin)")
    images = [x[None] for b in calib_batches for x in b.detach().float().cpu().numpy()] if int8 else []
    if int8 and not images:
        raise UserError("openvino-int8 needs calibration images: the calibration set is empty")
    extra = {}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        # NNCF quantizes the float graph; onnxruntime keeps our activation QDQ and adds the rest
        export_module(model, meta, onnx_path, imgsz, opset=opset, act_qdq=not int8 or quantizer == "onnxruntime",
                      source=source, decode=decode, space_to_depth=space_to_depth)
        if int8 and quantizer == "onnxruntime":
            quantize_int8(onnx_path, Path(tmp) / "int8.onnx", [torch.from_numpy(x) for x in images],
                          full_range_weights=full_range_weights, op_types=OV_ORT_OP_TYPES)
            onnx_path, extra["quantizer"] = Path(tmp) / "int8.onnx", "onnxruntime (QDQ graph converted)"
        proto = onnx.load(str(onnx_path))
        ov_meta = read_meta(proto)
        ov_model = ov.convert_model(str(onnx_path))
    if int8 and quantizer == "nncf":
        ov_model, extra["quantizer"] = _nncf_int8(ov_model, proto, images, full_range_weights)
    if int8:
        extra.update(precision="int8", weight_code_bits=8 if full_range_weights else 7, calibration_images=len(images))
    ov_meta = {**ov_meta, **extra, "runtime": "openvino", "openvino": ov.__version__}
    ov_model.set_rt_info(json.dumps(ov_meta), [META_KEY])
    return save_ir(ov_model, out)
