"""A short training run per detector on real chips: the loss falls, checkpoints are fp32, MLflow has it all."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rsdet_compress.engine.trainer import TrainConfig, _is_integration, train
from rsdet_compress.errors import UserError
from rsdet_compress.runtime.checkpoint import load_detector

LOSSES = ("train/box_loss", "train/cls_loss", "train/dfl_loss")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["skynet", "yolov8n"])
def test_short_training_lowers_loss_and_is_logged(model: str, tiny_data: Path, tmp_path: Path):
    import mlflow

    out = tmp_path / model
    cfg = TrainConfig(model=model, data=str(tiny_data), epochs=4, imgsz=256, batch=8, fraction=0.06,
                      mosaic=0.0, close_mosaic=0, warmup_epochs=0, val=False, out=str(out), verbose=False,
                      experiment="test-train")
    result = train(cfg)

    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    first, last = (sum(h[k] for k in LOSSES) for h in (history[0], history[-1]))
    assert last < first, f"training did not lower the loss: {first:.3f} -> {last:.3f}"

    # fp32 checkpoint in our format, reloadable with its structure and class names
    ckpt = torch.load(result["weights"], map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())
    reloaded, meta = load_detector(result["weights"])
    assert meta["detector"] == model and meta["names"][0] == "car" and meta["imgsz"] == 256
    assert json.loads((out / "metrics.json").read_text())["final"]["split"] == "val"
    final = result["final"]
    assert 0.0 <= final["map50"] <= 1.0 and final["params"] == sum(p.numel() for p in reloaded.parameters())

    # exactly one MLflow run (ours), with params, per-epoch metrics, final mAP and the weights
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("test-train")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == result["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.params["model"] == model and run.data.params["epochs"] == "4"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/box_loss")]
    assert steps == [1, 2, 3, 4]
    assert "final.map50" in run.data.metrics and "final.map50_95" in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "weights")]
    assert artifacts == ["weights/best.pt"] or artifacts == ["weights/last.pt"]


def test_ultralytics_integration_callbacks_are_filtered():
    from ultralytics.utils.callbacks import base
    from ultralytics.utils.callbacks import mlflow as ul_mlflow
    assert _is_integration(ul_mlflow.on_fit_epoch_end)
    assert _is_integration(ul_mlflow.on_train_end)
    assert not _is_integration(base.on_fit_epoch_end)
    assert not _is_integration(lambda trainer: None)


def test_bad_training_config(tiny_data: Path, tmp_path: Path):
    with pytest.raises(UserError, match="unknown model 'resnet'"):
        train(TrainConfig(model="resnet", data=str(tiny_data), out=str(tmp_path / "x"), track=False))
    with pytest.raises(UserError, match="augment"):
        train(TrainConfig(model="skynet", data=str(tiny_data), augment="fancy", track=False))
    with pytest.raises(UserError, match="dataset YAML not found"):
        train(TrainConfig(model="skynet", data=str(tmp_path / "nope.yaml"), track=False))
