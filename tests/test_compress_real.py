"""Compression on a really trained detector and real validation chips: mAP is what the policy promises."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rsdet_compress.compress.baselines import magnitude_pruning, uniform_bits
from rsdet_compress.compress.calibration import calibration_set
from rsdet_compress.compress.compressor import Workspace
from rsdet_compress.data.config import load_data_config
from rsdet_compress.data.evalset import EvalSet
from rsdet_compress.engine.evaluator import Evaluator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(trained_yolov8n: Path, small_airbus: Path):
    torch.set_num_threads(2)
    ws = Workspace.from_weights(trained_yolov8n)
    data = load_data_config(small_airbus)
    evaluator = Evaluator(EvalSet.from_coco(data.split_coco("val"), data.split_images("val"), ws.view.imgsz))
    calib = calibration_set(str(small_airbus), ws.view.imgsz, 32)
    float_map = evaluator(ws.view.model)
    assert float_map["map50"] > 0.25, f"the trained detector is too weak to test with: {float_map['map50']:.3f}"
    return ws, evaluator, calib, float_map


def test_all_8bit_keeps_map_within_half_a_point(setup):
    ws, evaluator, calib, ref = setup
    compressed = ws.apply(ws.resolve(uniform_bits(ws.view, 8)), calib)
    m = evaluator(compressed)
    assert abs(m["map50"] - ref["map50"]) <= 0.005, (ref["map50"], m["map50"])
    assert abs(m["map50_95"] - ref["map50_95"]) <= 0.005, (ref["map50_95"], m["map50_95"])


def test_low_bits_and_pruning_cost_map_and_bn_recal_choice(setup):
    """The measurements are not blind: 2-bit destroys the detector; BN recalibration (the default only
    when channels are pruned) repairs pruning but is not applied after quantization alone."""
    ws, evaluator, calib, ref = setup
    assert evaluator(ws.apply(ws.resolve(uniform_bits(ws.view, 2)), calib))["map50"] < 0.5 * ref["map50"]
    pruned = ws.resolve(magnitude_pruning(ws.view, 0.3))
    assert pruned.changes_structure(ws.view) and not uniform_bits(ws.view, 4).changes_structure(ws.view)
    default = evaluator(ws.apply(pruned, calib))["map50"]
    stale = evaluator(ws.apply(pruned, calib, bn=False))["map50"]
    assert default > stale, (default, stale)
    # the float model the search keeps reusing is unchanged by all of the above
    assert evaluator(ws.view.model)["map50"] == ref["map50"]


def test_compressed_model_trains_and_validates_in_ultralytics_loop(setup, small_airbus: Path, tmp_path: Path):
    """One epoch of ultralytics' own train + validate loop on a pruned 4-bit model keeps its structure."""
    from rsdet_compress.compress.baselines import two_stage
    from rsdet_compress.compress.quant import QConv2d
    from rsdet_compress.data.config import load_data_config as _data
    from rsdet_compress.engine.trainer import DetectorTrainer, TrainConfig, _overrides
    from rsdet_compress.runtime.checkpoint import load_detector

    ws, _, calib, _ = setup
    policy = ws.resolve(two_stage(ws.view, 0.3, 4))
    model = ws.apply(policy, calib, share_weights=False)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(model="yolov8n", data=str(small_airbus), epochs=1, imgsz=ws.view.imgsz, batch=8,
                      fraction=0.1, mosaic=0.0, close_mosaic=0, warmup_epochs=0, val=True,
                      out=str(tmp_path / "ft"), verbose=False, track=False)
    trainer = DetectorTrainer(model, _overrides(cfg, _data(small_airbus), tmp_path / "ft"), meta={"imgsz": 320})
    trainer.train()
    assert trainer.metrics and 0.0 <= trainer.metrics["metrics/mAP50(B)"] <= 1.0  # ultralytics' validator ran
    reloaded, meta = load_detector(trainer.last)
    assert meta["compressed"]
    assert {k: v.shape for k, v in reloaded.state_dict().items()} == shapes
    assert sum(isinstance(m, QConv2d) for m in reloaded.modules()) == sum(isinstance(m, QConv2d)
                                                                          for m in model.modules()) > 50
    changed = [k for k, v in reloaded.state_dict().items() if k.endswith("conv.weight")
               and not torch.equal(v, before[k])]
    assert changed, "the compressed weights should have been trained"
