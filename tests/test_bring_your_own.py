"""Bring your own detector and data: ultralytics-trained checkpoints and plain ultralytics data YAMLs.

A YOLOv8s, a YOLO11s and a YOLOv8n-P2 are trained a few steps by ultralytics' own trainer on
real airbus chips and saved by it (fp16 module inside a dict), then go through the whole
workflow: policy -> compress -> evaluate -> export -> predict (and, for one of them, search,
finetune and recover), every output reloading with the compressed structure (shapes,
per-channel bits, activation bits).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from clitools import run_error

from rsdet_compress.cli.main import main
from rsdet_compress.engine.finetune import FinetuneConfig, finetune, structure
from rsdet_compress.engine.recovery import RecoverConfig, recover
from rsdet_compress.errors import UserError
from rsdet_compress.runtime.checkpoint import load_detector
from rsdet_compress.runtime.loader import load_model
from rsdet_compress.search.runner import SearchConfig, search

pytestmark = pytest.mark.slow

#: not registered by their checkpoint's name alone: two larger scales and the small-object P2 head
MODELS = ["yolov8s", "yolo11s", "yolov8n-p2"]
#: these also run search, finetune and recover: past loading, every model takes the same code there
FULL_WORKFLOW = {"yolo11s"}
#: small enough for three s-scale models on 2 cores; a multiple of the deepest stride (32)
IMGSZ = 160


def ultralytics_train(cfg: str, data: Path, out: Path, **overrides) -> Path:
    """Train ``cfg`` a few steps with ultralytics' own trainer, as a user would; its saved last.pt."""
    from ultralytics import YOLO
    args = dict(data=str(data), epochs=1, imgsz=IMGSZ, batch=4, fraction=0.05, workers=0, device="cpu",
                plots=False, val=False, project=str(out), name=Path(cfg).stem, exist_ok=True, verbose=False,
                amp=False, seed=0, deterministic=True)
    YOLO(cfg).train(**{**args, **overrides})
    return out / Path(cfg).stem / "weights" / "last.pt"


@pytest.fixture(scope="module", params=MODELS)
def user_checkpoint(request, small_airbus: Path, tmp_path_factory) -> tuple[str, Path]:
    return request.param, ultralytics_train(f"{request.param}.yaml", small_airbus, tmp_path_factory.mktemp("ul"))


@pytest.fixture(scope="module")
def plain_airbus(small_airbus: Path, tmp_path_factory) -> Path:
    """The same chips as ``small_airbus`` as a plain ultralytics data set: images/ and labels/, no COCO JSON."""
    root = tmp_path_factory.mktemp("plain") / "airbus"
    for sub in ("images", "labels"):
        shutil.copytree(small_airbus.parent / sub, root / sub, ignore=shutil.ignore_patterns("*.cache", "*.json"))
    names = yaml.safe_load(small_airbus.read_text())["names"]
    (root / "data.yaml").write_text(yaml.safe_dump(
        {"path": str(root), "train": "images/train", "val": "images/val", "test": "images/test", "names": names}))
    return root / "data.yaml"


def _cli(capsys, *argv) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, f"{argv[0]} exit {rc}: {err[-1500:]}"
    return out


def test_ultralytics_checkpoint_through_the_whole_workflow(user_checkpoint, plain_airbus: Path, tmp_path: Path,
                                                           capsys):
    name, weights = user_checkpoint
    saved = torch.load(weights, map_location="cpu", weights_only=False)
    assert next(saved["model"].parameters()).dtype == torch.float16, "ultralytics saves fp16"

    policy = tmp_path / "policy.json"
    _cli(capsys, "policy", "--weights", weights, "--uniform-bits", 4, "--act-bits", 8, "--prune", 0.25,
         "--imgsz", IMGSZ, "--out", policy)
    assert json.loads(policy.read_text())["detector"] == name

    compressed = tmp_path / "compressed.pt"
    _cli(capsys, "compress", "--weights", weights, "--policy", policy, "--out", compressed,
         "--data", plain_airbus, "--calib-images", 8)
    model, meta = load_detector(compressed)
    shape = structure(model)
    assert meta["compressed"] and meta["detector"] == name
    assert sum("weight_bits" in r for r in shape.values()) > 30
    ckpt = torch.load(compressed, weights_only=True)  # plain data only: the architecture travels as a dict
    assert ckpt["arch"]["head"] == saved["model"].yaml["head"]

    report = json.loads(_cli(capsys, "evaluate", "--weights", compressed, "--data", plain_airbus, "--json"))
    assert report["detector"] == name and report["images"] > 0
    assert report["ratios"]["size"] > 8 and report["ratios"]["flops"] > 1.3 and report["size_mb"] > 0

    # the fine-tuned checkpoint is what gets exported when there is one
    deploy = _search_finetune_recover(name, weights, compressed, plain_airbus, shape, tmp_path) \
        if name in FULL_WORKFLOW else compressed
    folder = tmp_path / "export"
    _cli(capsys, "export", "--weights", deploy, "--format", "onnx,packed", "--data", plain_airbus,
         "--split", "val", "--out", folder)
    packed = next(folder.glob("*.packed"))
    again, packed_meta = load_model(packed)
    assert packed_meta["detector"] == name and structure(again) == shape
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    deployed, _ = load_detector(deploy)  # outside no_grad: rebuilding the pruned structure traces with autograd
    with torch.no_grad():
        assert torch.equal(again(x)[0], deployed(x)[0])
    onnx_model, onnx_meta = load_model(next(folder.glob("*.onnx")))
    assert onnx_meta["detector"] == name

    chip = next((plain_airbus.parent / "images" / "val").iterdir())
    _cli(capsys, "predict", "--weights", packed, "--source", chip, "--out", tmp_path / "pred")
    assert list((tmp_path / "pred").rglob("*.json"))


def _search_finetune_recover(name: str, weights: Path, compressed: Path, plain_airbus: Path, shape: dict,
                             tmp_path: Path) -> Path:
    """Search from the user's weights; fine-tune and recover the compressed checkpoint: the fine-tuned one."""
    result = search(SearchConfig(weights=str(weights), data=str(plain_airbus), agent="ajpq", episodes=2, seed=0,
                                 calib_images=4, reward_images=8, budget=["size=0.125"]), progress=False)
    assert len(result.candidates) == 2 and result.best_policy is not None
    assert result.best_policy.detector == name

    tuned = finetune(FinetuneConfig(weights=str(compressed), data=str(plain_airbus), epochs=1, batch=4,
                                    fraction=0.05, val=False, seed=0, out=str(tmp_path / "ft"), track=False))
    tuned_model, _ = load_detector(tuned["weights"])
    assert structure(tuned_model) == shape

    recovered = recover(RecoverConfig(weights=str(compressed), data=str(plain_airbus), images=16, iters=2,
                                      val=False, track=False, out=str(tmp_path / "recovered.pt")))
    assert recovered["structure_kept"] and structure(load_detector(recovered["weights"])[0]) == shape
    return Path(tuned["weights"])


def test_plain_ultralytics_yaml_scores_like_the_prepared_copy(trained_yolov8n: Path, small_airbus: Path,
                                                              plain_airbus: Path):
    from rsdet_compress.engine.scorer import evaluate
    prepared = evaluate(trained_yolov8n, small_airbus, split="test")
    plain = evaluate(trained_yolov8n, plain_airbus, split="test")
    assert prepared["map50"] > 0.2, "the trained test detector detects, so equal scores mean something"
    assert plain["images"] == prepared["images"]
    assert plain["map50"] == pytest.approx(prepared["map50"], abs=1e-4)
    assert plain["map50_95"] == pytest.approx(prepared["map50_95"], abs=1e-4)
    cached = plain_airbus.parent / "labels" / "test.coco.json"
    assert cached.is_file()


def test_derived_ground_truth_follows_label_edits(plain_airbus: Path, tmp_path: Path):
    from rsdet_compress.data.config import load_data_config
    root = tmp_path / "ds"
    shutil.copytree(plain_airbus.parent, root, ignore=shutil.ignore_patterns("*.json", "*.cache"))
    yaml_text = (root / "data.yaml").read_text().replace(str(plain_airbus.parent), ".")
    (root / "data.yaml").write_text(yaml_text)  # relative path: to the YAML's folder
    cfg = load_data_config(root / "data.yaml")
    first = json.loads(cfg.split_coco("val").read_text())
    label = next(p for p in sorted((root / "labels" / "val").glob("*.txt")) if p.read_text().strip())
    label.write_text(label.read_text() + "0 0.5 0.5 0.2 0.2\n")
    second = json.loads(cfg.split_coco("val").read_text())
    assert len(second["annotations"]) == len(first["annotations"]) + 1

    label.write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(UserError, match=r"expected 5 fields") as e:
        cfg.split_coco("val")
    assert str(label) in str(e.value)


@pytest.mark.parametrize("task,cfg", [("segment", "yolov8n-seg.yaml"), ("pose", "yolo11n-pose.yaml"),
                                      ("obb", "yolov8n-obb.yaml")])
def test_non_detect_checkpoints_are_refused(task: str, cfg: str, tmp_path: Path, capsys):
    from ultralytics.nn.tasks import OBBModel, PoseModel, SegmentationModel
    model = {"segment": SegmentationModel, "pose": PoseModel, "obb": OBBModel}[task](cfg, nc=2, verbose=False)
    pt = tmp_path / f"{task}.pt"
    torch.save({"model": model.half(), "train_args": {"task": task}}, pt)  # as ultralytics saves it
    run_error(capsys, ["policy", "--weights", pt, "--uniform-bits", 4, "--out", tmp_path / "p.json"], str(pt), task)
    assert not (tmp_path / "p.json").exists()


def test_unknown_architecture_is_refused(small_airbus: Path, tmp_path: Path, capsys):
    from rsdet_compress.detectors.checkpoint import save_detector
    from rsdet_compress.detectors.factory import create_detector
    ours = save_detector(create_detector("yolov8n", 2), tmp_path / "ours.pt")
    ckpt = torch.load(ours, weights_only=True)
    ckpt["detector"], ckpt["arch"] = "mystery-net", None
    torch.save(ckpt, ours)
    run_error(capsys, ["evaluate", "--weights", ours, "--data", small_airbus], str(ours), "mystery-net")
