"""``export``: write a deployable artifact and prove it by mAP against the PyTorch model it came from.

Formats (:data:`FORMATS`): ``onnx`` (fp32 graph, physically pruned, a
compressed model's activation quantizers as QDQ; see
:mod:`rsdet_compress.export.onnx`), ``onnx-int8`` (the same graph statically
quantized by onnxruntime: QDQ, int8 per-channel weights, uint8 activations
calibrated on training chips), ``openvino`` / ``openvino-int8`` (the same graph
as an OpenVINO IR, fp32 or int8 by NNCF; :mod:`rsdet_compress.export.openvino`)
and ``packed`` (the bit-packed deploy file of a compressed checkpoint,
:mod:`rsdet_compress.export.packed`).

Every artifact is reloaded with :func:`~rsdet_compress.runtime.loader.load_model`
and scored with the same :class:`~rsdet_compress.engine.evaluator.Evaluator` on
the same split as the PyTorch model. When ``|mAP50(artifact) - mAP50(PyTorch)|``
exceeds the format's tolerance the artifact is renamed to ``<name>.failed`` (so
nothing at the requested path looks complete) and a :class:`UserError` says by
how much.

``round8`` rounds a compressed checkpoint's kept channel counts up to multiples
of 8 (:mod:`rsdet_compress.compress.rounding`), re-applies and recalibrates it,
saves it beside the artifact as ``<stem>.round8.pt`` and makes it the PyTorch
reference of the check. Fine-tuned checkpoints are refused: round them at
``compress --round8``, before fine-tuning.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from rsdet_compress.compress.calibration import calibration_set, image_batches
from rsdet_compress.compress.compressor import Workspace
from rsdet_compress.compress.quant import iter_act_quantizers
from rsdet_compress.compress.rounding import CHANNEL_MULTIPLE, round_policy
from rsdet_compress.data.config import load_data_config
from rsdet_compress.data.evalset import EvalSet
from rsdet_compress.detectors.checkpoint import check_classes, save_detector
from rsdet_compress.engine.evaluator import Evaluator
from rsdet_compress.engine.scorer import check_batch
from rsdet_compress.errors import UserError
from rsdet_compress.export.onnx import (
    DEFAULT_OPSET,
    FULL_RANGE_WEIGHTS,
    check_opset,
    export_module,
    quantize_int8,
)
from rsdet_compress.export.openvino import OV_QUANTIZERS, export_openvino, require_nncf
from rsdet_compress.export.packed import fp32_bytes, save_packed
from rsdet_compress.runtime.checkpoint import load_detector
from rsdet_compress.runtime.decode import DECODES
from rsdet_compress.runtime.loader import load_model
from rsdet_compress.runtime.openvino import bin_path, require_openvino

FORMATS = ("onnx", "onnx-int8", "openvino", "openvino-int8", "packed")
#: default artifact name: the weights' stem + this suffix (an OpenVINO IR also gets the .bin beside its .xml)
SUFFIXES = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "openvino": ".xml", "openvino-int8": ".int8.xml",
            "packed": ".packed"}
#: formats that need calibration chips
CALIBRATED = ("onnx-int8", "openvino-int8")
#: fp32 ONNX: the same arithmetic as PyTorch up to float reassociation (BN folded into convs,
#: onnxruntime's kernels); outputs differ by ~2e-4 px in boxes and ~1e-6 in scores. Measured
#: dmAP50 = 0.0000 (mAP50-95 -0.0000) for yolov8n on airbus val; 0.002 leaves room for a
#: near-tie detection swapping rank on another model, while a real bug (a lost layer, wrong
#: quantizer, bad anchors) moves mAP by far more. Models with quantized activations: below.
ONNX_TOLERANCE = 0.002
#: int8 ONNX: a real second rounding (uint8 activations by MinMax calibration, int8 per-channel
#: weights on 7 bits, see FULL_RANGE_WEIGHTS). Measured dmAP50 = -0.0008 for the test-suite
#: yolov8n on airbus val (32 calibration chips); the published int8 PTQ loss of YOLOv8n is about
#: 0.5-1 mAP point on COCO. 0.02 (2 points) flags a broken quantization (wrong ranges, quantized
#: box decoding, saturating kernels: tens of points) without failing on small/noisy splits.
INT8_TOLERANCE = 0.02
#: fp32 ONNX of a compressed model whose activations are fake-quantized (QDQ in the graph): the
#: output is a step function of the input, and float reassociation (BN folded, other conv
#: kernels; even torch's own fake_quantize, which multiplies by 1/scale) flips a rounding at a
#: level boundary now and then. One flip at 4 bits moves that whole chip (every anchor sees it
#: through SPPF and the top-down path): 7 of 104 airbus chips, scores <= 0.05, boxes a few pixels,
#: mostly on low-confidence anchors whose DFL is flat. Measured dmAP50 on airbus val (yolov8n, 30% pruned):
#: w8a8 -0.0019, w4a4 0.0000, w4a4 round8 0.0000; 0.01 keeps a 5x margin over that noise.
ONNX_QDQ_TOLERANCE = 0.01
#: packed file: reloads bit-exactly (same fake-quantized model), so the mAP must be identical.
PACKED_TOLERANCE = 1e-9
#: OpenVINO: the same graphs as onnx / onnx-int8 on other kernels, the same tolerances (NNCF's ranges are
#: its own calibration, a second rounding like onnxruntime's).
TOLERANCES = {"onnx": ONNX_TOLERANCE, "onnx-int8": INT8_TOLERANCE, "openvino": ONNX_TOLERANCE,
              "openvino-int8": INT8_TOLERANCE, "packed": PACKED_TOLERANCE}


@dataclass
class ExportOptions:
    """How an artifact is made and checked: the defaults of :func:`export` and the ``export`` command's flags."""

    #: dataset YAML for the mAP check and calibration (default: the checkpoint's)
    data: str | None = None
    #: split the mAP check runs on
    split: str = "val"
    #: training chips for int8 calibration
    calib_images: int = 64
    #: allowed |mAP50 difference| (default: the format's own)
    tolerance: float | None = None
    #: round kept channel counts up to a multiple of 8 (compressed checkpoints)
    round8: bool = False
    #: onnx-int8: full 8-bit weight codes, only for targets whose int8 kernels cannot saturate (VNNI, ARM)
    full_range_weights: bool = FULL_RANGE_WEIGHTS
    #: ONNX opset (default: the newest the exporter writes)
    opset: int = DEFAULT_OPSET
    #: onnx / openvino formats: "graph" decodes boxes in the graph (any ONNX consumer can use the output);
    #: "host" ends the graph at the head's convs and decodes in vectorised torch when our runtime loads it
    #: (the in-graph DFL softmax and re-quantizations cost int8 CPU runtimes more than the convs they follow)
    decode: str = "graph"
    #: openvino-int8: "nncf" quantizes the float graph with NNCF's ranges; "onnxruntime" converts the onnx-int8 QDQ
    #: graph (a compressed model's own activation ranges kept): whichever measures better on the target CPU
    ov_quantizer: str = "nncf"
    #: evaluation batch size
    batch: int = 16

_REFERENCE_CACHE: dict[tuple, dict] = {}


def default_out(weights: str | Path, fmt: str, round8: bool = False) -> Path:
    """``<weights folder>/<stem>[.round8]<suffix>``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + (".round8" if round8 else "") + SUFFIXES[fmt])


def check_format(fmt: str) -> str:
    """A known format whose optional packages are installed (checked before any work)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt.startswith("openvino"):
        require_openvino()
    if fmt == "openvino-int8":
        require_nncf()
    return fmt


def _data_yaml(data: str | Path | None, meta: dict, weights: Path) -> Path:
    """The dataset YAML the mAP check runs on: ``data``, else the one the weights were trained on."""
    path = Path(data) if data else (Path(meta["data"]) if meta.get("data") else None)
    if path is None:
        raise UserError(f"{weights}: no dataset recorded in the checkpoint; give --data to verify the export by mAP")
    if not path.is_file():
        raise UserError(f"{path}: dataset YAML not found (give --data)")
    return path


def _calibration(data: Path, imgsz: int, n: int):
    """Training chips for int8 calibration / round8 recalibration; UserError when there are none."""
    if n < 1:
        raise UserError(f"--calib-images must be >= 1, got {n}")
    try:
        calib = calibration_set(str(data), imgsz, n)
    except UserError as e:
        raise UserError(f"missing calibration set: {e}") from None
    if len(calib) == 0:
        raise UserError(f"{data}: missing calibration set: the 'train' split has no images")
    return calib


def _evaluator(data: Path, split: str, imgsz: int, batch: int):
    cfg = load_data_config(data)
    return Evaluator(EvalSet.from_coco(cfg.split_coco(split), cfg.split_images(split), imgsz), batch=batch)


def _reference(model: nn.Module, key: tuple, evaluator) -> dict:
    """PyTorch metrics, computed once per (weights, data, split, imgsz) in this process."""
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = evaluator(model)
    return _REFERENCE_CACHE[key]


def _quantizes_activations(model: nn.Module) -> bool:
    return any(q.enabled and bool(q.observed) for q in iter_act_quantizers(model))


# ------------------------------------------------------------------ round8
def round_channels(model: nn.Module, meta: dict, calib, multiple: int = CHANNEL_MULTIPLE) -> tuple[nn.Module, dict]:
    """Compressed ``model`` with every pruned group's kept count rounded up to ``multiple`` (see module doc).

    Returns the recalibrated model and ``{"groups_changed", "channels_added"}``; a model
    whose groups are all multiples already (or a float model) comes back unchanged. A
    fine-tuned checkpoint is refused: the rounded model is rebuilt from the float
    weights, which would silently drop the fine-tuning (round at ``compress --round8``).
    """
    policy = getattr(model, "policy", None)
    if policy is None:
        return model, {"groups_changed": 0, "channels_added": 0}
    if meta.get("finetuned_from"):
        raise UserError("round8 rebuilds the model from its float weights and would drop this checkpoint's "
                        "fine-tuning: round before fine-tuning (`compress --round8`), or export without --round8")
    src = Path(str(meta.get("float_weights") or ""))
    if not src.is_file():
        raise UserError(f"round8 re-ranks channels on the float weights the checkpoint was compressed from: "
                        f"float_weights {str(src) or '(not recorded)'} not found")
    ws = Workspace.from_weights(src, policy.imgsz)
    if meta.get("float_fingerprint") and ws.weights_fp != meta["float_fingerprint"]:
        raise UserError(f"{src}: not the float weights this checkpoint was compressed from (fingerprint differs)")
    ws.grad_set = calib
    resolved, info = round_policy(ws, policy, multiple)
    if not info["groups_changed"]:
        return model, info
    return ws.apply(resolved, calib, share_weights=False), info


# ------------------------------------------------------------------ export
def _write(fmt: str, model: nn.Module, meta: dict, weights: Path, out: Path, imgsz: int, opset: int,
           calib, full_range_weights: bool = FULL_RANGE_WEIGHTS, decode: str = "graph",
           ov_quantizer: str = "nncf") -> dict:
    """Write one artifact; returns format-specific report fields."""
    if fmt == "onnx":
        export_module(model, meta, out, imgsz, opset=opset, source=str(weights), decode=decode)
        return {}
    if fmt == "onnx-int8":
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".fp32.onnx")
        os.close(fd)
        try:
            export_module(model, meta, tmp, imgsz, opset=opset, source=str(weights), decode=decode)
            quantize_int8(tmp, out, image_batches(calib, 8), full_range_weights=full_range_weights)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return {"calib_images": len(calib)}
    if fmt.startswith("openvino"):
        batches = image_batches(calib, 8) if fmt == "openvino-int8" else None
        export_openvino(model, meta, out, imgsz, batches, opset=opset, source=str(weights),
                        full_range_weights=full_range_weights, decode=decode, quantizer=ov_quantizer)
        return {"calib_images": len(calib)} if batches is not None else {}
    r = save_packed(weights, out)
    return {k: v for k, v in r.items() if k not in ("path", "bytes", "fp32_bytes", "ratio")}


def export(weights: str | Path, format: str, out: str | Path | None = None,
           data: str | Path | None = ExportOptions.data, split: str = ExportOptions.split,
           calib_images: int = ExportOptions.calib_images, tolerance: float | None = ExportOptions.tolerance,
           round8: bool = ExportOptions.round8, opset: int = ExportOptions.opset,
           batch: int = ExportOptions.batch, full_range_weights: bool = ExportOptions.full_range_weights,
           decode: str = ExportOptions.decode, ov_quantizer: str = ExportOptions.ov_quantizer) -> dict:
    """Export ``weights`` (a float or compressed checkpoint) as ``format`` and verify it by mAP.

    Returns the report: ``path``, ``bytes`` (on disk), ``fp32_bytes`` (the same architecture's
    float tensors at fp32) and ``ratio``; ``map50``/``map50_95`` of the artifact and
    ``torch_map50``/``torch_map50_95`` of the PyTorch model on ``split`` of ``data`` (default:
    the dataset recorded in the checkpoint), their differences ``dmap50``/``dmap50_95``,
    ``tolerance`` and ``passed``. Raises UserError (artifact renamed ``*.failed``) when
    ``|dmap50| > tolerance`` (default: the format's, see :data:`TOLERANCES`, and
    :data:`ONNX_QDQ_TOLERANCE` for an fp32 ONNX with quantized activations).
    """
    fmt = check_format(format)
    weights = Path(weights)
    if weights.suffix.lower() in (".onnx", ".xml"):
        raise UserError(f"{weights}: export starts from a PyTorch checkpoint (.pt), not an exported model")
    if tolerance is not None and tolerance < 0:
        raise UserError(f"--tolerance must be >= 0, got {tolerance}")
    check_batch(batch)
    check_opset(opset)
    if decode not in DECODES:
        raise UserError(f"unknown --decode {decode!r}; choose one of: {', '.join(DECODES)}")
    if ov_quantizer not in OV_QUANTIZERS:
        raise UserError(f"unknown --ov-quantizer {ov_quantizer!r}; choose one of: {', '.join(OV_QUANTIZERS)}")
    if decode != "graph" and fmt == "packed":
        raise UserError("--decode applies to the onnx and openvino formats; the packed file is a checkpoint")
    model, meta = load_detector(weights)
    if fmt == "packed" and not meta.get("compressed"):
        raise UserError(f"{weights}: the packed format needs a compressed checkpoint (rsdet-compress compress)")
    policy = getattr(model, "policy", None)
    imgsz = int((policy.imgsz if policy is not None else 0) or meta.get("imgsz") or 640)
    data = _data_yaml(data, meta, weights)
    check_classes(meta, load_data_config(data).names, weights, data)
    out = Path(out) if out else default_out(weights, fmt, round8)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give the artifact's file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    calib = _calibration(data, imgsz, calib_images) if fmt in CALIBRATED or round8 else None
    evaluator = _evaluator(data, split, imgsz, batch)
    src, round_info = weights, None
    if round8:
        model, round_info = round_channels(model, meta, calib)
        if round_info["groups_changed"]:
            src = out.with_name(weights.stem + ".round8.pt")
            meta = {**meta, "round8": round_info}
            save_detector(model, src, {k: v for k, v in meta.items()
                                       if k not in ("detector", "num_classes", "names", "compressed")})
            round_info["weights"] = str(src)
    tol = float(tolerance) if tolerance is not None else TOLERANCES[fmt]
    if tolerance is None and fmt in ("onnx", "openvino") and _quantizes_activations(model):
        tol = ONNX_QDQ_TOLERANCE
    stat = src.stat()
    key = (str(src.resolve()), stat.st_mtime_ns, str(data.resolve()), split, imgsz)
    ref = _reference(model, key, evaluator)
    t0 = time.perf_counter()
    extra = _write(fmt, model, meta, src, out, imgsz, opset, calib, full_range_weights, decode, ov_quantizer)
    seconds = time.perf_counter() - t0
    artifact, _ = load_model(out)
    got = evaluator(artifact)
    files = [out, bin_path(out)] if fmt.startswith("openvino") else [out]
    size, fp32 = sum(f.stat().st_size for f in files), fp32_bytes(model)
    d50, d5095 = got["map50"] - ref["map50"], got["map50_95"] - ref["map50_95"]
    report = {"format": fmt, "path": str(out), "weights": str(weights), "bytes": size, "fp32_bytes": fp32,
              "ratio": fp32 / size, "map50": got["map50"], "map50_95": got["map50_95"],
              "torch_map50": ref["map50"], "torch_map50_95": ref["map50_95"], "dmap50": d50, "dmap50_95": d5095,
              "tolerance": tol, "passed": abs(d50) <= tol, "split": split, "images": got["images"], "imgsz": imgsz,
              "data": str(data), "export_seconds": round(seconds, 2),
              "images_per_second": got["images_per_second"], "torch_images_per_second": ref["images_per_second"],
              "round8": round_info, **extra}
    if not report["passed"]:
        for f in files[::-1]:  # the entry point (.xml) last: never left pointing at a moved .bin
            os.replace(f, f.with_name(f.name + ".failed"))
        failed = out.with_name(out.name + ".failed")
        raise UserError(f"{out}: {fmt} mAP50 {got['map50']:.4f} is off from the PyTorch model's {ref['map50']:.4f} "
                        f"by {d50:+.4f}, beyond the tolerance {tol} (artifact moved to {failed.name})")
    return report
