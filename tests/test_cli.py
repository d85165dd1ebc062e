"""The ``rsdet-compress`` command line, run in-process (``main([...])``) and once as the installed script.

Bad input must end with exit code 2 and exactly one stderr line ``error: ...``
naming the file or field at fault, never a traceback. The happy paths run on
four real KIT aerial-cars images cut into 256 px chips, with an untrained
yolov8n checkpoint, so the whole file stays fast on a CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from clitools import run_error
from rawdata import KIT_IMAGES, copy_kit

from rsdet_compress.cli.main import main

# Imported now (it imports ultralytics): ultralytics binds its log handler to the sys.stdout of the
# moment it is first imported; inside a test that would be a capsys stream closed after the test.
from rsdet_compress.detectors import registry  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = Path(sys.executable).parent / "rsdet-compress"
PREP_FLAGS = ["--tile", "256", "--overlap", "0", "--split", "0.5,0.25,0.25", "--seed", "0", "--quiet"]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial") or ".partial" in p.name)


@pytest.fixture(scope="module")
def kit4_src(kit_dir: Path, tmp_path_factory) -> Path:
    return copy_kit(kit_dir, tmp_path_factory.mktemp("raw") / "kit4")


@pytest.fixture(scope="module")
def kit4_data(kit4_src: Path, tmp_path_factory) -> Path:
    """The four images prepared (Python API) into 256 px chips: 2 train, 1 val, 1 test source image."""
    from rsdet_compress.data.prepare import PrepareConfig, prepare
    out = tmp_path_factory.mktemp("prep") / "kit4"
    prepare(PrepareConfig(format="yolo", src=str(kit4_src), out=str(out), tile=256, overlap=0.0,
                          split=(0.5, 0.25, 0.25), seed=0), progress=False)
    return out / "data.yaml"


@pytest.fixture(scope="module")
def checkpoint(kit_names: list[str], tmp_path_factory) -> Path:
    """An untrained yolov8n for the 5 KIT classes, trained-at size 256."""
    from rsdet_compress.detectors.checkpoint import save_detector
    from rsdet_compress.detectors.factory import create_detector
    torch.manual_seed(0)
    model = create_detector("yolov8n", len(kit_names), names=kit_names)
    return save_detector(model, tmp_path_factory.mktemp("ckpt") / "yolov8n-kit.pt", meta={"imgsz": 256})


# --- models / entry point ------------------------------------------------------------------------

def test_models_lists_detectors(capsys):
    assert main(["models"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"skynet", "yolov8n", "yolo11n"} <= set(listed)


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1"}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def test_console_script_models(tmp_path):
    assert SCRIPT.is_file(), f"console script not installed at {SCRIPT} (pip install -e .)"
    r = _script("models", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert {"skynet", "yolov8n", "yolo11n"} <= set(r.stdout.split())


def test_importing_the_package_keeps_torch_threads_for_child_processes():
    """ultralytics' import writes OMP_NUM_THREADS=1; processes started after it must not inherit one thread."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = ("import os, torch; default = torch.get_num_threads(); import rsdet_compress.engine.trainer; "
            "print(default, os.environ['OMP_NUM_THREADS'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    default, inherited = r.stdout.split()
    assert inherited == default  # what a child would use: torch's own default here, not ultralytics' 1


def test_console_script_error_is_one_line(tmp_path):
    missing = tmp_path / "missing.pt"
    r = _script("evaluate", "--weights", str(missing), "--data", str(tmp_path / "data.yaml"), "--no-track",
                cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], r.stderr
    assert "Traceback" not in r.stderr


# --- bad input: exit code 2, one line naming the file or field ---------------------------------------

def test_prepare_unknown_format(capsys, kit4_src, tmp_path):
    out = tmp_path / "out"
    run_error(capsys, ["data", "prepare", "--format", "nosuchformat", "--src", kit4_src, "--out", out, *PREP_FLAGS],
              "nosuchformat", "--format")
    assert not out.exists() and not leftovers(tmp_path)


def test_prepare_into_existing_folder(capsys, kit4_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run_error(capsys, ["data", "prepare", "--format", "yolo", "--src", kit4_src, "--out", out, *PREP_FLAGS],
              str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    assert not leftovers(tmp_path)


def test_train_unknown_model(capsys, tiny_data, tmp_path):
    run_error(capsys, ["train", "--model", "nosuchnet", "--data", tiny_data, "--out", tmp_path / "run",
                       "--epochs", "1", "--no-track"], "nosuchnet")
    assert not (tmp_path / "run").exists()


def test_train_data_yaml_with_missing_val_folder(capsys, tmp_path, kit_names):
    root = tmp_path / "ds"
    (root / "images" / "train").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "train" / "a.png"), np.zeros((32, 32, 3), np.uint8))
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"names": dict(enumerate(kit_names)), "nc": len(kit_names),
                                    "train": "images/train", "val": "images/val"}))
    run_error(capsys, ["train", "--model", "skynet", "--data", data, "--epochs", "1", "--no-track",
                       "--out", tmp_path / "run"], str(data), "'val'")


def test_train_config_with_unknown_key(capsys, tmp_path, tiny_data):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(f"model: skynet\ndata: {tiny_data}\nepochz: 3\n")
    run_error(capsys, ["train", "--config", cfg, "--no-track"], str(cfg), "epochz")


def test_train_config_missing(capsys, tmp_path):
    cfg = tmp_path / "nope.yaml"
    run_error(capsys, ["train", "--config", cfg], str(cfg))


def test_evaluate_missing_weights(capsys, tmp_path, kit4_data):
    missing = tmp_path / "missing.pt"
    run_error(capsys, ["evaluate", "--weights", missing, "--data", kit4_data, "--no-track"], str(missing))


def test_evaluate_corrupted_weights(capsys, tmp_path, kit4_data):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(os.urandom(2048))
    run_error(capsys, ["evaluate", "--weights", bad, "--data", kit4_data, "--no-track"], str(bad))


def test_evaluate_missing_data_yaml(capsys, tmp_path, checkpoint):
    data = tmp_path / "nodata.yaml"
    run_error(capsys, ["evaluate", "--weights", checkpoint, "--data", data, "--no-track"], str(data))


def test_predict_non_image_source(capsys, tmp_path, checkpoint):
    src = tmp_path / "notes.txt"
    src.write_text("not an image\n")
    out = tmp_path / "pred"
    run_error(capsys, ["predict", "--weights", checkpoint, "--source", src, "--out", out], str(src))
    assert not out.exists() and not leftovers(tmp_path)


def test_predict_missing_source(capsys, tmp_path, checkpoint):
    src = tmp_path / "nothing.png"
    run_error(capsys, ["predict", "--weights", checkpoint, "--source", src, "--out", tmp_path / "pred"], str(src))


def test_console_script_evaluate_json_stdout_is_pure_json(tmp_path, checkpoint, kit4_data, kit_names):
    """`evaluate --json | jq` must work: nothing else (ultralytics logs...) may reach stdout."""
    r = _script("evaluate", "--weights", str(checkpoint), "--data", str(kit4_data), "--split", "val",
                "--no-track", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _check_metrics(json.loads(r.stdout), kit_names)


# --- data prepare on real images -------------------------------------------------------------------

def test_prepare_real_kit_images(capsys, kit4_src, kit_names, tmp_path):
    out = tmp_path / "prepared"
    capsys.readouterr()
    rc = main(["data", "prepare", "--format", "yolo", "--src", str(kit4_src), "--out", str(out), *PREP_FLAGS])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert "kit4" in stdout and "car" in stdout and "tiles" in stdout  # the summary table
    assert f"wrote {out}/data.yaml" in stdout

    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == dict(enumerate(kit_names))
    assert data["nc"] == len(kit_names)
    assert data["rsdet"]["tile"] == 256
    sources = set()
    for split in ("train", "val", "test"):
        chips = sorted((out / "images" / split).iterdir())
        labels = sorted((out / "labels" / split).iterdir())
        assert chips, f"no {split} chips"
        assert [p.stem for p in chips] == [p.stem for p in labels]
        coco = json.loads((out / "annotations" / f"{split}.json").read_text())
        assert [c["name"] for c in coco["categories"]] == kit_names
        assert len(coco["images"]) == len(chips)
        assert {im["file_name"] for im in coco["images"]} == {p.name for p in chips}
        split_sources = {im["source_image"] for im in coco["images"]}
        assert not split_sources & sources, "a source image straddles two splits"
        sources |= split_sources
        for im in coco["images"]:
            assert (im["width"], im["height"]) == (256, 256)
        n_label_rows = sum(len(p.read_text().splitlines()) for p in labels)
        assert n_label_rows == len(coco["annotations"])
    assert sources == set(KIT_IMAGES)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["tile"] == 256
    assert not leftovers(tmp_path)


def test_prepare_bad_label_row_leaves_nothing(capsys, kit_dir, tmp_path):
    src = copy_kit(kit_dir, tmp_path / "raw")
    label = src / "labels" / f"{KIT_IMAGES[2]}.txt"
    rows = label.read_text().splitlines()
    rows.insert(1, "0 0.5 0.5 0.1")  # 4 fields on line 2
    label.write_text("\n".join(rows) + "\n")
    out = tmp_path / "prepared"
    run_error(capsys, ["data", "prepare", "--format", "yolo", "--src", src, "--out", out, *PREP_FLAGS],
              f"{label}:2")
    assert not out.exists()
    assert not leftovers(tmp_path)


def test_prepare_failure_while_tiling_leaves_nothing(capsys, kit4_src, tmp_path, monkeypatch):
    """A failure after chips were written (third image unreadable) removes the temporary folder."""
    import rsdet_compress.data.prepare as prep
    real, calls = prep._read_image, []

    def flaky(path: Path):
        calls.append(path)
        if len(calls) == 3:
            from rsdet_compress.errors import UserError
            raise UserError(f"{path}: unreadable image")
        return real(path)

    monkeypatch.setattr(prep, "_read_image", flaky)
    out = tmp_path / "prepared"
    run_error(capsys, ["data", "prepare", "--format", "yolo", "--src", kit4_src, "--out", out, *PREP_FLAGS],
              "unreadable image")
    assert len(calls) == 3
    assert not out.exists()
    assert not leftovers(tmp_path)


# --- evaluate ------------------------------------------------------------------------------------

METRIC_KEYS = ("map50", "map50_95", "ap_small", "ap_medium", "ap_large")


def _check_metrics(r: dict, kit_names: list[str]) -> None:
    for k in (*METRIC_KEYS, "per_class", "params", "gflops"):
        assert k in r, k
    assert r["map50"] is not None and r["map50_95"] is not None
    for k in METRIC_KEYS:
        assert r[k] is None or 0.0 <= r[k] <= 1.0, (k, r[k])
    assert set(r["per_class"]) == set(kit_names)
    for ap in r["per_class"].values():
        for v in ap.values():
            assert v is None or 0.0 <= v <= 1.0
    assert r["params"] > 1_000_000 and r["gflops"] > 0
    assert r["imgsz"] == 256 and r["split"] == "val"


def test_evaluate_json_no_track(capsys, checkpoint, kit4_data, kit_names, tmp_path):
    capsys.readouterr()
    rc = main(["evaluate", "--weights", str(checkpoint), "--data", str(kit4_data), "--split", "val",
               "--no-track", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, f"--json should print one JSON object, got {out!r}"
    r = json.loads(lines[0])
    assert isinstance(r, dict)
    _check_metrics(r, kit_names)
    assert r["detector"] == "yolov8n"
    assert not (tmp_path / "mlflow.db").exists(), "--no-track still created an MLflow store"


def test_evaluate_with_tracking(capsys, checkpoint, kit4_data, kit_names):
    import mlflow
    capsys.readouterr()
    rc = main(["evaluate", "--weights", str(checkpoint), "--data", str(kit4_data), "--split", "val"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "yolov8n on val" in out and "map50" in out and "GFLOPs" in out

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert "map50" in run.data.metrics
    assert 0.0 <= run.data.metrics["map50"] <= 1.0
    assert run.data.params["split"] == "val"


# --- predict -------------------------------------------------------------------------------------

def test_predict_real_image(capsys, checkpoint, kit_dir, kit_names, tmp_path):
    src = kit_dir / "images" / f"{KIT_IMAGES[0]}.png"
    out = tmp_path / "pred"
    capsys.readouterr()
    rc = main(["predict", "--weights", str(checkpoint), "--source", str(src), "--out", str(out),
               "--conf", "0.01"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert "detections in 1 image(s)" in stdout
    drawn = cv2.imread(str(out / src.name))
    original = cv2.imread(str(src))
    assert drawn is not None and drawn.shape == original.shape
    coco = json.loads((out / "detections.json").read_text())
    assert {"images", "annotations", "categories"} <= set(coco)
    assert [c["name"] for c in coco["categories"]] == kit_names
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(kit_names) + 1))
    (im,) = coco["images"]
    assert im["id"] == 1 and im["file_name"] == src.name
    assert (im["height"], im["width"]) == original.shape[:2]
    h, w = original.shape[:2]
    for a in coco["annotations"]:
        assert a["image_id"] == 1 and 1 <= a["category_id"] <= len(kit_names)
        x, y, bw, bh = a["bbox"]
        assert bw >= 0 and bh >= 0 and -1 <= x <= w + 1 and -1 <= y <= h + 1
        assert 0.01 <= a["score"] <= 1
    assert not leftovers(tmp_path)
