"""``policy``, ``compress`` and ``evaluate --policy`` through the CLI, on real chips."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rsdet_compress.cli.main import main
from rsdet_compress.compress.policy import Policy
from rsdet_compress.detectors.checkpoint import save_detector
from rsdet_compress.detectors.factory import create_detector
from rsdet_compress.runtime.checkpoint import load_detector

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def float_weights(tmp_path_factory) -> Path:
    model = create_detector("yolov8n", 5, names=["car", "truck", "bus", "minibus", "cyclist"])
    return save_detector(model, tmp_path_factory.mktemp("w") / "float.pt", {"imgsz": 256})


def test_policy_compress_evaluate(float_weights: Path, tiny_data: Path, tmp_path: Path, capsys):
    pol = tmp_path / "p.json"
    assert main(["policy", "--weights", str(float_weights), "--uniform-bits", "4", "--prune", "0.25",
                 "--out", str(pol)]) == 0
    policy = Policy.load(pol)
    assert policy.detector == "yolov8n" and policy.weights and policy.imgsz == 256
    assert all(g == {"keep": 0.75} for g in policy.groups.values())
    assert "x smaller" in capsys.readouterr().out

    out = tmp_path / "c.pt"
    assert main(["compress", "--weights", str(float_weights), "--policy", str(pol), "--out", str(out),
                 "--data", str(tiny_data), "--calib-images", "8"]) == 0
    model, meta = load_detector(out)
    assert meta["compressed"] and meta["calibrated"]
    assert sum(p.numel() for p in model.parameters()) < 3_000_000

    capsys.readouterr()
    assert main(["evaluate", "--weights", str(float_weights), "--data", str(tiny_data), "--policy", str(pol),
                 "--json", "--no-track"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["ratios"]["size"] > 7 and r["compressed"]["params"] < r["float"]["params"]


def test_policy_for_other_weights_is_refused(float_weights: Path, tmp_path: Path, capsys):
    pol = tmp_path / "p.json"
    assert main(["policy", "--weights", str(float_weights), "--uniform-bits", "8", "--out", str(pol)]) == 0
    other = save_detector(create_detector("yolov8n", 5), tmp_path / "other.pt", {"imgsz": 256})
    capsys.readouterr()
    assert main(["compress", "--weights", str(other), "--policy", str(pol), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other weights" in err[0] and not (tmp_path / "x.pt").exists()
