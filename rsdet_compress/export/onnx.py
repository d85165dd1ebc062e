"""ONNX export of float and compressed detectors, and onnxruntime int8 static quantization.

:func:`export_onnx` writes what the PyTorch model computes in eval mode: the
decoded Detect output ``(B, 4 + nc, anchors)`` (xywh boxes in input pixels,
class scores), with a dynamic batch (and, for the predictor, dynamic H and W:
the anchor grid is computed in the graph). It uses torch's TorchScript ONNX
exporter (opset <= 20; the dynamo exporter would need ``onnxscript``), which
also folds every BatchNorm into its conv.

A compressed checkpoint is exported as its physically pruned graph (conv
weights have the pruned shapes), and the fake quantization becomes:

* weights: baked in as plain fp32 conv weights holding the dequantized values
  (``codes * scale``, exactly what ``QConv2d`` computes), so onnxruntime's
  output matches PyTorch; the bit-packed storage is the ``packed`` format's job.
* activations: each calibrated ``ActQuantizer`` becomes the standard
  ``Clip -> QuantizeLinear(uint8) -> DequantizeLinear`` triple with the same
  scale and zero point. The Clip limits the values to the policy's ``2^b``
  levels (b < 8) so that ``round(clip(x) / s)`` equals PyTorch's
  ``clamp(round(x / s) + zp, 0, 2^b - 1) - zp`` exactly; at 8 bits it is
  omitted. ``act_qdq=False`` drops them instead (a float graph with the
  quantized weights: the input :func:`quantize_int8` expects).

Every file carries our metadata under the ``rsdet_compress`` key of
``metadata_props`` (one JSON object: :data:`FORMAT` marker, detector, class
names, imgsz, stride, rescale, policy summary; :mod:`rsdet_compress.runtime.onnx_meta`),
which :func:`rsdet_compress.runtime.loader.load_model` requires.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import tempfile
import types
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from rsdet_compress.atomic import atomic_path
from rsdet_compress.compress.quant import FLOAT_BITS, ActQuantizer, QConv2d, fake_quant_weight
from rsdet_compress.errors import UserError
from rsdet_compress.export.graph_forms import for_export
from rsdet_compress.runtime.checkpoint import load_detector
from rsdet_compress.runtime.decode import DECODES, decode_meta
from rsdet_compress.runtime.onnx_meta import FORMAT, META_KEY, VERSION, read_meta

#: newest opset torch's TorchScript ONNX exporter writes (torch 2.x).
DEFAULT_OPSET = 20
INPUT_NAME, OUTPUT_NAME = "images", "output0"


class ActQDQ(nn.Module):
    """An ``ActQuantizer``'s forward as ONNX ops: Clip (b < 8 bits) + QuantizeLinear/DequantizeLinear (uint8)."""

    def __init__(self, quantizer: ActQuantizer) -> None:
        super().__init__()
        if quantizer.bits > 8:
            raise UserError(f"activation bits {quantizer.bits} > 8 have no ONNX uint8 QDQ form")
        levels = 2 ** quantizer.bits - 1
        scale, zp = quantizer.qparams()
        self.clip = levels < 255
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())
        self.register_buffer("zero_point", zp.detach().to(torch.int32).reshape(()).clone())
        self.lo = float(-zp * scale)
        self.hi = float((levels - zp) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip:
            x = torch.clamp(x, self.lo, self.hi)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)


class _RawOutput(nn.Module):
    """The detector's inference output alone (eval-mode models return ``(y, raw)``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def _baked_conv(q: QConv2d) -> nn.Conv2d:
    """A plain conv with ``q``'s hyper-parameters and its fake-quantized (dequantized) weight."""
    conv = nn.Conv2d(q.in_channels, q.out_channels, q.kernel_size, stride=q.stride, padding=q.padding,
                     dilation=q.dilation, groups=q.groups, bias=q.bias is not None, padding_mode=q.padding_mode)
    with torch.no_grad():
        w = fake_quant_weight(q.weight, q.w_bits) if q.quantizes_weight else q.weight
        conv.weight.copy_(w.detach().float())
        if q.bias is not None:
            conv.bias.copy_(q.bias.detach().float())
    return conv


def _is_head(m: nn.Module) -> bool:
    return hasattr(m, "dynamic") and hasattr(m, "stride") and hasattr(m, "nl")  # ultralytics Detect heads


def _raw_head_output(head: nn.Module, x: dict) -> torch.Tensor:
    """``Detect._inference`` for ``decode="host"``: the head convs' outputs, undecoded (runtime.decode)."""
    return torch.cat((x["boxes"], x["scores"]), 1)


def detect_head(model: nn.Module) -> nn.Module:
    """The model's ultralytics Detect head (the last, if several)."""
    heads = [m for m in model.modules() if _is_head(m)]
    if not heads:
        raise UserError("no ultralytics Detect head in this model: its box decoding cannot move out of the graph")
    return heads[-1]


def exportable(model: nn.Module, act_qdq: bool = True, decode: str = "graph",
               space_to_depth: bool = True) -> nn.Module:
    """A float, eval-mode copy of ``model`` ready for ``torch.onnx.export``.

    ``QConv2d`` layers become plain convs with baked weights, preceded by an
    :class:`ActQDQ` when their activation quantizer is on and calibrated (and
    ``act_qdq``); Detect heads build their anchor grid from the input shape, or with
    ``decode="host"`` stop at their convs (:mod:`rsdet_compress.runtime.decode`); SkyNet's reorg
    becomes SpaceToDepth when ``space_to_depth`` (for onnxruntime; :mod:`.graph_forms`).
    """
    if decode not in DECODES:
        raise UserError(f"unknown --decode {decode!r}; choose one of: {', '.join(DECODES)}")
    model = copy.deepcopy(model).float().cpu().eval()
    swaps = [(n, m) for n, m in model.named_modules() if isinstance(m, QConv2d)]
    for name, q in swaps:
        path, _, leaf = name.rpartition(".")
        parent = model.get_submodule(path) if path else model
        conv = _baked_conv(q)
        aq = q.act_quant
        if act_qdq and aq.enabled and bool(aq.observed):
            conv = nn.Sequential(ActQDQ(aq), conv)
        setattr(parent, leaf, conv)
    for m in model.modules():
        for_export(m, space_to_depth)
        if _is_head(m):
            m.dynamic = True
            if decode == "host":
                if getattr(m, "end2end", False):
                    raise UserError("decode 'host' covers the Detect head's DFL decoding; this head is end-to-end "
                                    "(its own top-k): export it with --decode graph")
                m._inference = types.MethodType(_raw_head_output, m)
    return _RawOutput(model).eval()


def policy_summary(model: nn.Module) -> dict | None:
    """Short description of a compressed model's policy (None for a float model) for the metadata."""
    policy = getattr(model, "policy", None)
    if policy is None:
        return None
    wbits: Counter = Counter()
    abits: Counter = Counter()
    for m in model.modules():
        if isinstance(m, QConv2d):
            wbits.update(int(min(b, FLOAT_BITS)) for b in m.w_bits.tolist())
            abits[int(m.act_quant.bits)] += 1
    return {"criterion": policy.criterion, "groups_pruned": len(policy.groups),
            "channels_kept": sum(len(g.get("keep_idx", [])) for g in policy.groups.values()),
            "blocks_skipped": policy.skipped,
            "weight_bits_channels": {str(k): v for k, v in sorted(wbits.items())},
            "act_bits_layers": {str(k): v for k, v in sorted(abits.items())}}


def onnx_meta(model: nn.Module, meta: dict, imgsz: int, precision: str, act_qdq: bool, source: str,
              decode: str = "graph") -> dict:
    """The JSON stored under :data:`META_KEY`: everything ``load_model`` and the evaluator need."""
    stride = getattr(model, "stride", None)
    stride = int(stride.max()) if isinstance(stride, torch.Tensor) and stride.numel() else 32
    names = meta.get("names") or [str(i) for i in range(int(meta["num_classes"]))]
    return {"format": FORMAT, "version": VERSION, "detector": meta.get("detector"),
            "num_classes": int(meta["num_classes"]), "names": list(names), "imgsz": int(imgsz),
            "stride": stride, "rescale": meta.get("rescale"), "compressed": bool(meta.get("compressed")),
            "precision": precision, "act_qdq": act_qdq, "policy": policy_summary(model), "source": source,
            **(decode_meta(detect_head(model)) if decode == "host" else {"decode": "graph"})}


def set_meta(model: onnx.ModelProto, meta: dict) -> None:
    for p in list(model.metadata_props):
        if p.key == META_KEY:
            model.metadata_props.remove(p)
    model.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    model.producer_name = "rsdet-compress"


def _save_checked(model: onnx.ModelProto, out: Path) -> Path:
    """Check ``model`` and write it atomically (temp file in the same folder, then rename)."""
    onnx.checker.check_model(model)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return out


def check_opset(opset: int) -> None:
    """An opset the exporter writes (checked before any work, and again at export)."""
    if not 13 <= opset <= DEFAULT_OPSET:
        raise UserError(f"opset {opset} not supported: give 13..{DEFAULT_OPSET}")


def export_module(model: nn.Module, meta: dict, out: str | Path, imgsz: int, opset: int = DEFAULT_OPSET,
                  dynamic_batch: bool = True, act_qdq: bool = True, source: str = "", decode: str = "graph",
                  space_to_depth: bool = True) -> Path:
    """Export an in-memory detector (float or compressed) to ``out``; see the module docstring.

    ``space_to_depth``: the graph onnxruntime runs fastest (see :func:`exportable`); the OpenVINO
    export turns it off.
    """
    check_opset(opset)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give the .onnx file's path")
    net = exportable(model, act_qdq, decode, space_to_depth)
    x = torch.zeros(2 if dynamic_batch else 1, 3, imgsz, imgsz)
    axes = {INPUT_NAME: {2: "height", 3: "width"}, OUTPUT_NAME: {2: "anchors"}}
    if dynamic_batch:
        axes[INPUT_NAME][0] = axes[OUTPUT_NAME][0] = "batch"
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        raw = Path(tmp) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(net, (x,), str(raw), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes=axes, do_constant_folding=True)
        proto = onnx.load(str(raw))
    _qdq_constants_to_initializers(proto)
    set_meta(proto, onnx_meta(model, meta, imgsz, "fp32", act_qdq and _has_act_quant(model), source, decode))
    return _save_checked(proto, out)


def _qdq_constants_to_initializers(model: onnx.ModelProto) -> None:
    """Make every Q/DQ scale and zero point an initializer of its own.

    The exporter leaves some as Constant nodes, or as Identity nodes of a shared
    initializer (equal values deduplicated). onnxruntime's quantizer treats a tensor
    coming out of an existing DequantizeLinear as already quantized only when it
    finds that node's scale among the initializers.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    wanted = {i for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:]}
    for node in list(graph.node):
        if node.output[0] not in wanted or node.output[0] in inits:
            continue
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            source = node.attribute[0].t
        elif node.op_type == "Identity" and node.input[0] in inits:
            source = inits[node.input[0]]
        else:
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(source)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        inits[tensor.name] = tensor
        graph.node.remove(node)


def _has_act_quant(model: nn.Module) -> bool:
    return any(q.enabled and bool(q.observed) for q in model.modules() if isinstance(q, ActQuantizer))


def export_onnx(weights: str | Path, out: str | Path, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                act_qdq: bool = True) -> Path:
    """Export a float or compressed checkpoint to ONNX at ``out`` (written atomically); returns ``out``."""
    model, meta = load_detector(weights)
    policy = getattr(model, "policy", None)
    imgsz = int(meta.get("imgsz") or (policy.imgsz if policy is not None else 0) or 640)
    return export_module(model, meta, out, imgsz, opset=opset, dynamic_batch=dynamic_batch, act_qdq=act_qdq,
                         source=str(weights))


# ------------------------------------------------------------------ int8 (onnxruntime)
def post_conv_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes after the detection head's last convs (DFL, box decoding, sigmoid, concat): kept in float.

    A node is "before" when some conv other than the DFL's fixed 1x1 conv consumes
    (directly or not) its output. The decoded boxes are pixel coordinates over the
    whole image: 256 levels would put them on a ~2.5 px grid at 640 px.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    needed: set[int] = set()
    stack = [n for n in graph.node if n.op_type == "Conv" and "dfl" not in n.name.lower()]
    while stack:
        n = stack.pop()
        if id(n) in needed:
            continue
        needed.add(id(n))
        stack.extend(producer[i] for i in n.input if i in producer)
    return [n.name for n in graph.node if id(n) not in needed]


class _Reader:
    """onnxruntime CalibrationDataReader over float image batches (B, 3, H, W), 0..1."""

    def __init__(self, batches: Iterable, input_name: str) -> None:
        self._it: Iterator = iter(batches)
        self.input_name = input_name
        self.count = 0

    def get_next(self) -> dict | None:
        x = next(self._it, None)
        if x is None:
            return None
        arr = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
        self.count += 1
        return {self.input_name: np.ascontiguousarray(arr, dtype=np.float32)}


class _DropPreprocessHint(logging.Filter):
    """Hides onnxruntime's "consider pre-processing" hint (printed on every call; its shape inference is
    for models without shapes, ours have them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


#: int8 weight codes stay within 7 bits (symmetric, -64..64) by default. On x86 CPUs without VNNI (AVX2, AVX-512F
#: alone) onnxruntime's uint8 x int8 kernels use VPMADDUBSW, which adds two products into a saturating
#: int16: 255 * 127 * 2 overflows it, 255 * 64 * 2 cannot. Measured on an AVX2 EPYC, test-suite YOLOv8n,
#: airbus val: full 8-bit weights dmAP50 -0.022 (-0.144 on another training of the same recipe), 7-bit
#: -0.0008. VNNI and ARM kernels don't saturate: ``full_range_weights`` is for such targets only.
FULL_RANGE_WEIGHTS = False


def quantize_int8(onnx_in: str | Path, out: str | Path, calib_batches: Iterable, per_channel: bool = True,
                  quantize_head_outputs: bool = True, full_range_weights: bool = FULL_RANGE_WEIGHTS,
                  op_types: tuple[str, ...] | None = None) -> Path:
    """int8 static quantization of one of our float ONNX files with onnxruntime (QDQ format).

    Weights: int8, symmetric, per output channel (``per_channel``), codes within
    -64..64 unless ``full_range_weights`` (see :data:`FULL_RANGE_WEIGHTS`); activations:
    uint8 with MinMax ranges calibrated on ``calib_batches`` (real training chips,
    float 0..1). The box decoding after the head convs stays float (see
    :func:`post_conv_nodes`); ``quantize_head_outputs=False`` also keeps the
    head's last convs float. A compressed model's own activation QDQ (its policy's
    bit-widths and calibrated ranges) is kept and reused as the conv input's
    quantization; its weights, already on a <= 8-bit grid, are re-expressed as int8
    codes per channel. ``op_types`` limits which ops get Q/DQ (default: every op onnxruntime can quantize).
    Metadata is copied with ``precision: int8``.
    """
    # onnxruntime's quantization tools are only needed for int8 export: kept out of the CLI's start-up
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    onnx_in, out = Path(onnx_in), Path(out)
    model = onnx.load(str(onnx_in))
    meta = read_meta(model)
    if meta is None:
        raise UserError(f"{onnx_in}: not an rsdet-compress ONNX file")
    if meta.get("precision") != "fp32":
        raise UserError(f"{onnx_in}: already quantized ({meta.get('precision')}); give the fp32 ONNX file")
    exclude = post_conv_nodes(model)
    # a compressed model's own activation quantizers (Clip -> Q -> DQ) are kept as they are
    produced = {o: n for n in model.graph.node for o in n.output}
    exclude += [produced[n.input[0]].name for n in model.graph.node
                if n.op_type == "QuantizeLinear" and n.input[0] in produced
                and produced[n.input[0]].op_type == "Clip"]
    if not quantize_head_outputs:
        consumers = {i for n in model.graph.node if n.name not in exclude for i in n.input}
        exclude += [n.name for n in model.graph.node if n.op_type == "Conv" and n.output[0] not in consumers]
    batches = iter(calib_batches)
    first = next(batches, None)
    if first is None:
        raise UserError("onnx-int8 needs calibration images: the calibration set is empty")
    reader = _Reader(itertools.chain([first], batches), model.graph.input[0].name)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        q = Path(tmp) / "int8.onnx"
        quiet = _DropPreprocessHint()
        logging.getLogger().addFilter(quiet)
        try:
            quantize_static(str(onnx_in), str(q), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            reduce_range=not full_range_weights, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=exclude, op_types_to_quantize=list(op_types) if op_types else None)
        finally:
            logging.getLogger().removeFilter(quiet)
        proto = onnx.load(str(q))
    set_meta(proto, {**meta, "precision": "int8", "per_channel": per_channel,
                      "weight_code_bits": 8 if full_range_weights else 7,
                      "calibration_batches": reader.count})
    return _save_checked(proto, out)
