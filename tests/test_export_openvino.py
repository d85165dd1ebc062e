"""OpenVINO IR export and runtime: matches PyTorch, int8 (NNCF) keeps mAP, reloads, predicts, times; bad input.

Runs on the really trained small YOLOv8n and real airbus chips (conftest fixtures).
"""
from __future__ import annotations

import json
import shutil
import sys
from collections import Counter

import pytest
import torch

from rsdet_compress.cli.main import main
from rsdet_compress.compress.calibration import calibration_set
from rsdet_compress.compress.compressor import Workspace, compress
from rsdet_compress.compress.policy import Policy
from rsdet_compress.engine.latency import LatencyConfig, benchmark
from rsdet_compress.errors import UserError
from rsdet_compress.export import exporter
from rsdet_compress.export.exporter import INT8_TOLERANCE, ONNX_QDQ_TOLERANCE, ONNX_TOLERANCE, export
from rsdet_compress.runtime.checkpoint import load_detector
from rsdet_compress.runtime.loader import load_model
from rsdet_compress.runtime.openvino import OpenVinoDetector
from rsdet_compress.runtime.profile import profile

ov = pytest.importorskip("openvino")  # an optional extra: the suite installs it (scripts/test.sh)

#: fp32 IR vs PyTorch on the decoded output, as for ONNX (float reassociation only; OpenVINO's kernels):
#: boxes in pixels at 320 px, scores are probabilities.
BOX_ATOL = 1e-2
SCORE_ATOL = 1e-4


@pytest.fixture(scope="module")
def chips(small_airbus) -> torch.Tensor:
    """Four real val chips, float 0..1 (1, 3, 320, 320) each."""
    return calibration_set(str(small_airbus), 320, 4, split="val").images.float().div(255)


@pytest.fixture(scope="module")
def float_ir(trained_yolov8n, small_airbus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ov") / "float.xml"
    report = export(trained_yolov8n, "openvino", out=out, data=small_airbus)
    return out, report


@pytest.fixture(scope="module")
def compressed(trained_yolov8n, small_airbus, tmp_path_factory):
    """The trained model pruned 30% (every group), 4-bit weights, 8-bit activations, calibrated."""
    view = Workspace.from_weights(trained_yolov8n).view
    policy = Policy(detector=view.detector, imgsz=view.imgsz, groups={g: {"keep": 0.7} for g in view.groups},
                    layers={n: {"weight_bits": 4, "act_bits": 8} for n in view.quantizable})
    out = tmp_path_factory.mktemp("ovc") / "w4a8p30.pt"
    compress(trained_yolov8n, policy, out, data=small_airbus, calib_images=16)
    return out


def _ops(path) -> Counter:
    return Counter(op.get_type_name() for op in ov.Core().read_model(str(path)).get_ordered_ops())


def test_float_ir_matches_pytorch_and_passes_its_map_check(trained_yolov8n, float_ir, chips):
    path, report = float_ir
    assert report["torch_map50"] > 0.2  # a real detector, so a broken export would show
    assert report["passed"] and abs(report["dmap50"]) <= ONNX_TOLERANCE
    assert path.with_suffix(".bin").is_file()
    assert report["bytes"] == path.stat().st_size + path.with_suffix(".bin").stat().st_size
    detector, meta = load_model(path)
    assert isinstance(detector, OpenVinoDetector) and meta["runtime"] == "openvino"
    assert meta["precision"] == "fp32" and meta["names"] == ["Airplane", "Truncated_airplane"]
    assert meta["imgsz"] == 320 and meta["stride"] == 32
    model, _ = load_detector(trained_yolov8n)
    with torch.no_grad():
        for batch in (chips[:1], chips[1:4]):  # two batch sizes through one file: each compiled for its shape
            ref, got = model(batch)[0], detector(batch)
            assert got.shape == ref.shape
            assert (got[:, :4] - ref[:, :4]).abs().max() <= BOX_ATOL
            assert (got[:, 4:] - ref[:, 4:]).abs().max() <= SCORE_ATOL
    assert len(detector._compiled) == 2


def test_compressed_ir_fp32_and_nncf_int8_keep_map_via_cli(compressed, small_airbus, tmp_path, capsys):
    rc = main(["export", "--weights", str(compressed), "--format", "openvino,openvino-int8", "--data",
               str(small_airbus), "--out", str(tmp_path), "--calib-images", "16", "--json"])
    assert rc == 0
    reports = {r["format"]: r for r in json.loads(capsys.readouterr().out)["artifacts"]}
    fp, q = reports["openvino"], reports["openvino-int8"]
    assert fp["torch_map50"] > 0.1
    # our own activation ranges ride in the fp32 IR as FakeQuantize
    assert fp["passed"] and abs(fp["dmap50"]) <= ONNX_QDQ_TOLERANCE
    assert _ops(fp["path"])["FakeQuantize"] > 0
    assert q["passed"] and abs(q["dmap50"]) <= INT8_TOLERANCE and q["calib_images"] == 16
    assert q["bytes"] < 0.4 * fp["bytes"]  # int8 weights
    ir = ov.Core().read_model(q["path"])
    ops = Counter(op.get_type_name() for op in ir.get_ordered_ops())
    assert ops["FakeQuantize"] > 20
    # the box decoding stays float: nothing feeds the DFL softmax or the class sigmoid through a FakeQuantize
    for op in ir.get_ordered_ops():
        if op.get_type_name() in ("Softmax", "Sigmoid"):
            assert op.input_value(0).get_node().get_type_name() != "FakeQuantize", op.get_friendly_name()
    meta = load_model(q["path"])[1]
    assert meta["precision"] == "int8" and meta["weight_code_bits"] == 7 and meta["compressed"]
    # the profile says what the CPU plugin really ran: every quantized convolution on an int8 kernel
    prof = profile(q["path"], batch=1, imgsz=160, runs=2, warmup=1)
    convs = [o for o in prof.ops if o.op == "Convolution"]
    assert sum(o.nodes for o in convs if "I8" in o.kernel.upper()) >= 0.9 * sum(o.nodes for o in convs) > 20
    assert prof.wall_ms > 0 and abs(sum(o.share for o in prof.ops) - 1) < 1e-6


def test_onnxruntime_quantized_ir_keeps_our_ranges(compressed, small_airbus, tmp_path):
    """``--ov-quantizer onnxruntime``: the onnx-int8 QDQ graph (our activation scales) run by OpenVINO."""
    r = export(compressed, "openvino-int8", out=tmp_path / "q.xml", data=small_airbus, calib_images=8,
               ov_quantizer="onnxruntime", decode="host")
    assert r["passed"] and abs(r["dmap50"]) <= INT8_TOLERANCE
    meta = load_model(r["path"])[1]
    assert meta["quantizer"].startswith("onnxruntime") and meta["decode"] == "host" and meta["precision"] == "int8"
    ops = _ops(r["path"])
    assert ops["FakeQuantize"] > 20 and ops["Softmax"] == 0
    # SiLU is fused (Swish) as in NNCF's IR: no FakeQuantize between its Sigmoid and Mul
    assert ops.get("Swish", 0) > 20 and ops.get("Sigmoid", 0) == 0
    with pytest.raises(UserError, match="unknown --ov-quantizer 'tflite'"):
        export(compressed, "openvino-int8", out=tmp_path / "x.xml", data=small_airbus, ov_quantizer="tflite")


def test_predict_and_benchmark_run_the_ir(float_ir, small_airbus, tmp_path):
    path, _ = float_ir
    cfg = LatencyConfig(batches=(1, 2), runs=2, warmup=1, imgsz=160, devices=("cpu",))
    rows = benchmark([path], cfg)
    assert [(r.backend, r.batch) for r in rows] == [("openvino", 1), ("openvino", 2)]
    assert all(r.speedup == 1.0 and r.median_ms > 0 for r in rows)
    assert rows[0].size_bytes == path.stat().st_size + path.with_suffix(".bin").stat().st_size
    images = tmp_path / "chips"
    images.mkdir()
    for chip in sorted((small_airbus.parent / "images" / "val").iterdir())[:2]:
        shutil.copy(chip, images / chip.name)
    out = tmp_path / "pred"
    assert main(["predict", "--weights", str(path), "--source", str(images), "--out", str(out)]) == 0
    assert any(out.iterdir())


def test_failed_check_moves_both_files(trained_yolov8n, small_airbus, tmp_path, monkeypatch):
    real = exporter._reference
    monkeypatch.setattr(exporter, "_reference", lambda *a: {**real(*a), "map50": 0.99})
    out = tmp_path / "bad.xml"
    with pytest.raises(UserError, match="beyond the tolerance"):
        export(trained_yolov8n, "openvino", out=out, data=small_airbus)
    assert not out.exists() and not out.with_suffix(".bin").exists()
    assert (tmp_path / "bad.xml.failed").exists() and (tmp_path / "bad.bin.failed").exists()


def test_bad_ir_files_are_one_line(float_ir, tmp_path):
    path, _ = float_ir
    lone = tmp_path / "lone.xml"
    lone.write_bytes(path.read_bytes())
    with pytest.raises(UserError, match="lone.bin is missing"):
        load_model(lone)
    (tmp_path / "junk.xml").write_text("<not an IR")
    (tmp_path / "junk.bin").write_bytes(b"")
    with pytest.raises(UserError, match="junk.xml: not an OpenVINO IR"):
        load_model(tmp_path / "junk.xml")
    x = ov.opset13.parameter([1, 3, 8, 8], name="x")
    foreign = ov.Model([ov.opset13.relu(x)], [x], "foreign")
    ov.save_model(foreign, str(tmp_path / "foreign.xml"))
    with pytest.raises(UserError, match="not an rsdet-compress OpenVINO IR"):
        load_model(tmp_path / "foreign.xml")


@pytest.mark.parametrize("argv, message", [
    (["export", "--weights", "W", "--format", "onnx,openvino"], "OpenVINO is not installed"),
    (["benchmark", "--openvino", "model.xml"], "OpenVINO is not installed"),
    (["benchmark", "--openvino", "model.onnx"], "--openvino takes OpenVINO IR .xml files"),
    (["export", "--weights", "W", "--format", "tensorrt"], "unknown export format 'tensorrt'"),
])
def test_missing_package_or_unknown_runtime_is_one_line_exit_2(trained_yolov8n, small_airbus, tmp_path, argv,
                                                                message, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an install without the extra sees
    monkeypatch.chdir(tmp_path)
    argv = [str(trained_yolov8n) if a == "W" else a for a in argv]
    assert main([*argv, *(["--data", str(small_airbus)] if argv[0] == "export" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not list(tmp_path.iterdir())  # refused before the first artifact (the onnx) was written


def test_a_concat_input_pruned_away_recovers_and_leaves_both_graphs(small_airbus, chips, tmp_path):
    """A policy may prune every channel one input brings to a concat (SkyNet's reorg bypass): recovery fits it,
    and the ONNX and OpenVINO graphs drop the branch instead of carrying a zero-channel tensor."""
    from rsdet_compress.detectors.checkpoint import save_detector
    from rsdet_compress.detectors.factory import create_detector
    from rsdet_compress.detectors.skynet import Reorg
    from rsdet_compress.engine.recovery import RecoverConfig, recover
    from rsdet_compress.export.onnx import export_module
    from rsdet_compress.export.openvino import export_openvino
    torch.manual_seed(0)
    weights = save_detector(create_detector("skynet", 2, names=["Airplane", "Truncated_airplane"]),
                            tmp_path / "skynet.pt", {"imgsz": 160})  # small: recovery runs at stride 8
    view = Workspace.from_weights(weights).view
    group = view.groups["model.7.pw"]  # the concat of the reorg's 768 channels (first) and model.7's 512
    assert group.size == 768 + 512
    policy = Policy(detector="skynet", imgsz=160, groups={"model.7.pw": {"keep_idx": list(range(768, 1280))}},
                    layers={n: {"weight_bits": 8, "act_bits": 8} for n in view.quantizable})
    ckpt = compress(weights, policy, tmp_path / "no-reorg.pt", data=small_airbus, calib_images=16)["out"]
    model, meta = load_detector(ckpt)
    assert [m.keep.numel() for m in model.modules() if isinstance(m, Reorg)] == [0]
    rec = recover(RecoverConfig(weights=str(ckpt), data=str(small_airbus), images=16, iters=2, val=False,
                                track=False, out=str(tmp_path / "recovered.pt")))
    assert rec["structure_kept"] and any(row["steps"] > 0 for row in rec["layers"])
    model, meta = load_detector(rec["weights"])
    import onnx
    plain = export_module(model, meta, tmp_path / "no-reorg.onnx", 160, act_qdq=False)
    assert not [n for n in onnx.load(str(plain)).graph.node if n.op_type == "Transpose" and "model.8" in n.name]
    ir = export_openvino(model, meta, tmp_path / "no-reorg.xml", 160)
    with torch.no_grad():
        ref, got = model(chips[:2])[0], load_model(ir)[0](chips[:2])
    assert (got[:, :4] - ref[:, :4]).abs().max() <= BOX_ATOL and (got[:, 4:] - ref[:, 4:]).abs().max() <= SCORE_ATOL
