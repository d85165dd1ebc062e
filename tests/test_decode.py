"""Box decoding outside the graph (``--decode host``): the same boxes as the detector's own head, every runtime.

Tolerances are those of the fp32 ONNX export (float reassociation only): boxes within 1e-2 px,
scores within 1e-4. Every registered detector gets the graph-level check; the trained test-suite
YOLOv8n on real chips gets the runtimes and the int8 mAP check.
"""
from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch

from rsdet_compress.compress.calibration import calibration_set
from rsdet_compress.detectors.factory import create_detector
from rsdet_compress.detectors.registry import list_detectors
from rsdet_compress.errors import UserError
from rsdet_compress.export.exporter import INT8_TOLERANCE, export
from rsdet_compress.export.onnx import export_module
from rsdet_compress.runtime.checkpoint import load_detector
from rsdet_compress.runtime.decode import HostDecoder
from rsdet_compress.runtime.loader import OnnxDetector, load_model

BOX_ATOL = 1e-2
SCORE_ATOL = 1e-4


def _close(ref: torch.Tensor, got: torch.Tensor) -> None:
    assert got.shape == ref.shape
    assert (got[:, :4] - ref[:, :4]).abs().max() <= BOX_ATOL
    assert (got[:, 4:] - ref[:, 4:]).abs().max() <= SCORE_ATOL


@pytest.mark.parametrize("name", list_detectors())
def test_host_decode_matches_the_head_for_every_detector(name, tmp_path, one_thread):
    torch.manual_seed(0)
    model = create_detector(name, 3, names=["car", "truck", "bus"]).eval()
    meta = {"detector": name, "num_classes": 3, "names": ["car", "truck", "bus"]}
    ops = {}
    for decode in ("graph", "host"):
        path = export_module(model, meta, tmp_path / f"{decode}.onnx", 256, decode=decode)
        ops[decode] = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    # the DFL softmax and the class sigmoid leave the graph; the SiLUs (and YOLO11's attention softmax) stay
    assert ops["host"]["Softmax"] == ops["graph"]["Softmax"] - 1
    assert ops["host"]["Sigmoid"] == ops["graph"]["Sigmoid"] - 1
    det = OnnxDetector(path)
    assert det.meta["decode"] == "host" and det.meta["reg_max"] == 16
    x = torch.rand(2, 3, 256, 320, generator=torch.Generator().manual_seed(1))  # not square: anchors per size
    with torch.no_grad():
        _close(model(x)[0], det(x))


@pytest.fixture(scope="module")
def chips(small_airbus) -> torch.Tensor:
    return calibration_set(str(small_airbus), 320, 3, split="val").images.float().div(255)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_host_decoded_file_matches_pytorch_on_real_chips(fmt, trained_yolov8n, small_airbus, chips, tmp_path):
    if fmt == "openvino":
        pytest.importorskip("openvino")
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m.xml")
    report = export(trained_yolov8n, fmt, out=out, data=small_airbus, decode="host")
    assert report["passed"] and report["torch_map50"] > 0.2
    detector, meta = load_model(out)
    assert meta["decode"] == "host" and meta["strides"] == [8.0, 16.0, 32.0]
    model, _ = load_detector(trained_yolov8n)
    with torch.no_grad():
        for batch in (chips[:1], chips):
            _close(model(batch)[0], detector(batch))


def test_host_decoded_int8_keeps_map_and_its_decode_float(trained_yolov8n, small_airbus, tmp_path):
    report = export(trained_yolov8n, "onnx-int8", out=tmp_path / "q.onnx", data=small_airbus, decode="host",
                    calib_images=16)
    assert report["passed"] and abs(report["dmap50"]) <= INT8_TOLERANCE
    graph = onnx.load(report["path"]).graph
    last = graph.output[0].name
    producer = {o: n for n in graph.node for o in n.output}
    assert producer[last].op_type == "Concat"  # raw boxes + logits in float: no Q/DQ after the last convs
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_bad_decode_settings_are_one_line(trained_yolov8n, small_airbus, tmp_path):
    with pytest.raises(UserError, match="unknown --decode 'cpu'"):
        export(trained_yolov8n, "onnx", out=tmp_path / "m.onnx", data=small_airbus, decode="cpu")
    with pytest.raises(UserError, match="unknown box decoding 'gpu'"):
        HostDecoder.from_meta({"decode": "gpu"})
    assert HostDecoder.from_meta({}) is None  # files written before the option decode in their graph
    dec = HostDecoder(16, [8.0, 16.0, 32.0])
    with pytest.raises(UserError, match="has 100 anchors, an input of 320x320 .* has 2100"):
        dec(torch.zeros(1, 66, 100), (320, 320))
    assert not (tmp_path / "m.onnx").exists()
