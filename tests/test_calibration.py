"""Calibration data on real chips: loss batches match the YOLO labels; Taylor importance from real gradients."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rsdet_compress.compress.calibration import accumulate_gradients, calibration_set, labelled_batches
from rsdet_compress.compress.compressor import Workspace
from rsdet_compress.compress.importance import importance_scores
from rsdet_compress.compress.view import CompressibleView
from rsdet_compress.data.config import load_data_config
from rsdet_compress.detectors.checkpoint import save_detector
from rsdet_compress.detectors.factory import create_detector
from rsdet_compress.errors import UserError

torch.set_num_threads(1)


def test_labelled_batches_match_yolo_label_files(tiny_data: Path):
    """Boxes moved into the letterboxed frame equal ultralytics' own normalised labels on square chips."""
    cfg = load_data_config(tiny_data)
    evalset = calibration_set(str(tiny_data), 320, n_images=12)  # 256 px chips scaled up to 320
    batches = list(labelled_batches(evalset, batch=5))
    assert [b["img"].shape[0] for b in batches] == [5, 5, 2]
    checked = 0
    for k, b in enumerate(batches):
        assert b["img"].dtype == torch.float32 and 0.0 <= b["img"].min() and b["img"].max() <= 1.0
        for row in range(b["img"].shape[0]):
            i = k * 5 + row
            if evalset.shapes[i] != (256, 256):
                continue
            name = Path(evalset.coco.imgs[evalset.image_ids[i]]["file_name"]).stem
            label = cfg.split_images("train").parent.parent / "labels" / "train" / f"{name}.txt"
            want = np.loadtxt(label, ndmin=2) if label.stat().st_size else np.zeros((0, 5))
            mine = b["batch_idx"] == row
            got = torch.cat([b["cls"][mine], b["bboxes"][mine]], 1).numpy()
            order = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
            np.testing.assert_allclose(order(got), order(want), atol=2e-3)
            checked += len(want)
    assert checked > 20, "the first chips should hold cars"


def test_taylor_scores_come_from_loss_gradients(tiny_data: Path):
    model = create_detector("yolov8n", 5)
    view = CompressibleView(model, imgsz=256)
    with pytest.raises(UserError, match="taylor"):
        importance_scores(view, "taylor")
    evalset = calibration_set(str(tiny_data), 256, n_images=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accumulate_gradients(model, evalset, batch=4)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "no weight or BN may change"
    taylor, l1 = importance_scores(view, "taylor"), importance_scores(view, "l1")
    assert taylor.keys() == l1.keys()
    assert all(s.shape == l1[g].shape and torch.isfinite(s).all() for g, s in taylor.items())
    differs = sum(not torch.equal(s.argsort(), l1[g].argsort()) for g, s in taylor.items())
    assert differs > len(taylor) // 2, "Taylor should rank channels differently from L1"


def test_workspace_taylor_needs_data(tiny_data: Path, tmp_path: Path):
    weights = save_detector(create_detector("skynet", 5), tmp_path / "w.pt", {"imgsz": 256})
    ws = Workspace.from_weights(weights)
    with pytest.raises(UserError, match="--data"):
        ws.scores("taylor")
    ws.grad_set = calibration_set(str(tiny_data), 256, n_images=4)
    scores = ws.scores("taylor")
    assert set(scores) == set(ws.view.groups) and ws.scores("taylor") is scores
    assert all(p.grad is None for p in ws.view.model.parameters()), "gradients are freed after ranking"
