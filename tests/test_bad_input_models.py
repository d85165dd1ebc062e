"""Bad input to the model/runtime commands: one ``error:`` line and exit 2, nothing run that should not run,
nothing lost, nothing half-written (issue 15).

Everything runs on four real KIT aerial-cars images prepared at 1/4 scale (a few 256 px chips), with
untrained checkpoints: the defects are about what is refused and what is left on disk, not about mAP.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from copy import deepcopy
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import run_error
from rawdata import copy_kit

from rsdet_compress.cli.main import main

# Imported now (it imports ultralytics): ultralytics binds its log handler to the sys.stdout of the
# moment it is first imported; inside a test that would be a capsys stream closed after the test.
from rsdet_compress.detectors.checkpoint import save_detector
from rsdet_compress.detectors.factory import create_detector
from rsdet_compress.runtime.checkpoint import load_detector

pytestmark = pytest.mark.usefixtures("one_thread")

DEAD_STORE = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused


def partials(folder: Path) -> list[str]:
    """Anything a writer leaves behind when it stops half-way (hidden temporaries, staged folders)."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".partial")))


@pytest.fixture(scope="module")
def data(kit_dir: Path, tmp_path_factory) -> Path:
    """Four real KIT images (1764 x 430) at 1/4 scale in 256 px chips: a data.yaml with 5 classes."""
    from rsdet_compress.data.prepare import PrepareConfig, prepare
    src = copy_kit(kit_dir, tmp_path_factory.mktemp("raw") / "kit4")
    out = tmp_path_factory.mktemp("prep") / "kit4"
    prepare(PrepareConfig(format="yolo", src=str(src), out=str(out), tile=256, overlap=0.0, rescale=0.5,
                          split=(0.5, 0.25, 0.25), seed=0), progress=False)
    return out / "data.yaml"


@pytest.fixture(scope="module")
def weights(kit_names: list[str], tmp_path_factory) -> Path:
    """An untrained SkyNet for the 5 KIT classes, trained-at size 256."""
    torch.manual_seed(0)
    model = create_detector("skynet", len(kit_names), names=kit_names)
    return save_detector(model, tmp_path_factory.mktemp("ckpt") / "skynet-kit.pt", meta={"imgsz": 256})


# ---------------------------------------------------------------- 1. no code runs from a weights/state file

class _Payload:
    """Unpickling this runs ``touch MARKER``: what a crafted checkpoint does to whoever loads it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def crafted(path: Path, marker: Path, **extra) -> Path:
    """A .pt shaped like an ultralytics checkpoint whose model, once unpickled, has run a shell command."""
    torch.save({"model": _Payload(marker), "train_args": {}, "date": "2026-01-01", "version": "8.4.190", **extra},
               path)
    return path


def prove_live(path: Path, marker: Path) -> None:
    """The payload really runs under a plain unpickle, so 'no marker' above means 'refused', not 'harmless'."""
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["evaluate", "predict", "compress", "benchmark"])
def test_crafted_weights_are_refused_and_run_nothing(command, capsys, tmp_path, data, kit_dir):
    marker = tmp_path / "PWNED"
    evil = crafted(tmp_path / "evil.pt", marker)
    policy = tmp_path / "p.json"
    policy.write_text("{}")
    argv = {"evaluate": ["evaluate", "--weights", evil, "--data", data, "--no-track"],
            "predict": ["predict", "--weights", evil, "--source", kit_dir / "images" / "MOS155.png",
                        "--out", tmp_path / "pred"],
            "compress": ["compress", "--weights", evil, "--policy", policy, "--out", tmp_path / "c.pt"],
            "benchmark": ["benchmark", "--weights", evil, "--no-track", "--runs", "1"]}[command]
    line = run_error(capsys, argv, evil, "system", "--trust-weights")
    assert "refused" in line
    assert not marker.exists(), "the crafted checkpoint ran its code"
    assert not (tmp_path / "pred").exists() and not (tmp_path / "c.pt").exists() and not partials(tmp_path)
    prove_live(evil, marker)


def test_trust_weights_is_an_explicit_opt_out_with_a_warning(capsys, tmp_path, data):
    marker = tmp_path / "PWNED"
    evil = crafted(tmp_path / "evil.pt", marker)
    capsys.readouterr()
    rc = main(["evaluate", "--weights", str(evil), "--data", str(data), "--no-track", "--trust-weights"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and marker.exists()  # trusted: unpickled (ran); then refused as not a detection model
    assert err[0].startswith("warning: --trust-weights") and err[-1].startswith("error: ") and len(err) == 2


def _ultralytics_checkpoints(names: list[str], folder: Path) -> tuple[Path, Path]:
    """(last.pt, best.pt) as ultralytics' trainer writes them (BaseTrainer.save_model, strip_optimizer)."""
    from ultralytics import __version__
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.torch_utils import strip_optimizer
    model = create_detector("yolov8n", len(names), names=names)
    args = get_cfg(overrides={"model": "yolov8n.yaml", "data": "kit.yaml", "imgsz": 256, "epochs": 1})
    model.args = args  # the trainer attaches its IterableSimpleNamespace
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    last, best = folder / "last.pt", folder / "best.pt"
    torch.save({"epoch": 0, "best_fitness": 0.1, "stopper": {"best_fitness": 0.1, "best_epoch": 0}, "model": None,
                "ema": deepcopy(model).half(), "updates": 3, "modelopt": None, "optimizer": opt.state_dict(),
                "scaler": {}, "train_args": vars(args), "train_metrics": {"metrics/mAP50(B)": 0.1, "fitness": 0.1},
                "train_results": {"epoch": [1.0]}, "date": datetime.now().astimezone().isoformat(),
                "version": __version__, "git": {"root": None, "branch": None, "commit": None},
                "license": "AGPL-3.0 (https://ultralytics.com/license)", "docs": "https://docs.ultralytics.com"},
               last)
    strip_optimizer(last, best)  # the released form: model (fp16, args as a dict), epoch -1, no optimizer
    return last, best


def test_real_ultralytics_checkpoints_still_load(capsys, tmp_path, data, kit_names):
    last, best = _ultralytics_checkpoints(kit_names, tmp_path)
    for path in (last, best):
        model, meta = load_detector(path)
        assert meta["detector"] == "yolov8n" and meta["names"] == kit_names and meta["imgsz"] == 256
        assert next(model.parameters()).dtype == torch.float32 and not model.training
    capsys.readouterr()
    assert main(["evaluate", "--weights", str(best), "--data", str(data), "--no-track", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["detector"] == "yolov8n" and r["imgsz"] == 256 and 0.0 <= r["map50"] <= 1.0


def test_search_resume_refuses_a_pickled_state_and_a_path_as_run_id(capsys, tmp_path):
    marker = tmp_path / "PWNED"
    run_dir = Path(os.environ["RSDET_RUNS"]) / "search" / "0123abcd"
    run_dir.mkdir(parents=True)
    evil = crafted(run_dir / "state.pt", marker)
    run_error(capsys, ["search", "--resume", "0123abcd", "--quiet"], evil, "system")
    assert not marker.exists()
    # a run id is a name, never a path to someone else's state.pt
    run_error(capsys, ["search", "--resume", "../../elsewhere", "--quiet"], "run id")
    prove_live(evil, marker)


def test_search_resume_refuses_a_latency_search_timed_on_another_cpu(capsys, tmp_path):
    from dataclasses import asdict

    from rsdet_compress.search.runner import SearchConfig, timing_machine
    from rsdet_compress.search.statefile import save_state
    cfg = SearchConfig(weights=str(tmp_path / "w.pt"), data=str(tmp_path / "d.yaml"),
                       budget=["flops=0.5", "latency=0.33"])
    here = timing_machine(cfg)
    assert here is not None and here["table"].startswith("onnxruntime-t")
    assert timing_machine(SearchConfig(budget=["size=0.125", "flops=0.5"])) is None  # no latency: any machine
    elsewhere = {"cpu": "Some Other CPU (avx2)", "threads": here["threads"], "table": "onnxruntime-t2-0000000000.json"}
    run_dir = Path(os.environ["RSDET_RUNS"]) / "search" / "feedbeef"
    save_state(run_dir / "state.pt", {"config": asdict(cfg), "timing_machine": elsewhere})
    run_error(capsys, ["search", "--resume", "feedbeef", "--quiet"], "Some Other CPU", here["cpu"],
              "start a new search")
    # the same machine passes this check and goes on to the next one (the weights file of this fake state)
    save_state(run_dir / "state.pt", {"config": asdict(cfg), "timing_machine": here})
    run_error(capsys, ["search", "--resume", "feedbeef", "--quiet"], "w.pt", "not found")


def test_search_state_round_trips_exactly_as_plain_data(tmp_path):
    from rsdet_compress.search.statefile import load_state, save_state
    rng = np.random.default_rng(3)
    state = {"rng": rng.bit_generator.state, "arr": rng.random((3, 2)).astype(np.float32),
             "flags": np.array([True, False]), "baseline": np.float64(0.1), "plain": 0.1, "n": np.int64(7),
             "elite": (0.5, np.arange(3), [np.float32(2.5)]), "t": torch.arange(4), "big": 2 ** 100, "none": None}
    back = load_state(save_state(tmp_path / "state.pt", state))
    assert back["rng"] == state["rng"] and back["big"] == 2 ** 100 and back["none"] is None
    for k in ("arr", "flags"):
        assert back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k])
    # np.float64 and float promote differently against float32 arrays: the type must survive, not only the value
    assert type(back["baseline"]) is np.float64 and type(back["plain"]) is float and type(back["n"]) is np.int64
    assert isinstance(back["elite"], tuple) and type(back["elite"][2][0]) is np.float32
    assert torch.equal(back["t"], state["t"])
    with pytest.raises(TypeError):
        save_state(tmp_path / "bad.pt", {"obj": object()})  # never silently pickled
    assert not (tmp_path / "bad.pt").exists() and not partials(tmp_path)


# ---------------------------------------------------------------- 2. silently broken models

def test_compress_refuses_zero_calibration_images(capsys, tmp_path, data, weights):
    policy = tmp_path / "p.json"
    assert main(["policy", "--weights", str(weights), "--uniform-bits", "8", "--out", str(policy)]) == 0
    out = tmp_path / "c.pt"
    run_error(capsys, ["compress", "--weights", weights, "--policy", policy, "--data", data,
                       "--calib-images", "0", "--out", out], "--calib-images", "0")
    assert not out.exists() and not partials(tmp_path)


def test_evaluate_refuses_weights_for_other_classes(capsys, tmp_path, data, kit_names):
    two = save_detector(create_detector("skynet", 2, names=["plane", "ship"]), tmp_path / "two.pt", {"imgsz": 256})
    run_error(capsys, ["evaluate", "--weights", two, "--data", data, "--no-track"], two, data, "2 classes", "has 5")
    renamed = [*kit_names[:-1], "plane"]  # same count, other classes: scores would be filed under wrong names
    other = save_detector(create_detector("skynet", 5, names=renamed), tmp_path / "other.pt", {"imgsz": 256})
    run_error(capsys, ["evaluate", "--weights", other, "--data", data, "--no-track"], "plane", "cyclist")


@pytest.mark.parametrize("flags,needle", [(["--episodes", "0"], "--episodes must be >= 1, got 0"),
                                          (["--episodes", "-3"], "--episodes must be >= 1, got -3"),
                                          (["--calib-images", "0"], "--calib-images must be >= 1"),
                                          (["--reward-images", "0"], "--reward-images must be >= 1")])
def test_search_zero_means_zero_not_default(flags, needle, capsys, data, weights):
    run_error(capsys, ["search", "--weights", weights, "--data", data, "--quiet", *flags], needle)
    assert not (Path(os.environ["RSDET_RUNS"]) / "search").exists()


# ---------------------------------------------------------------- 3. unbounded work

def test_predict_refuses_millions_of_windows_before_any_work(capsys, tmp_path, kit_dir, weights):
    from rsdet_compress.data.tiling import MAX_TILES_PER_IMAGE
    t0 = time.perf_counter()
    line = run_error(capsys, ["predict", "--weights", weights, "--source", kit_dir / "images" / "MOS155.png",
                              "--out", tmp_path / "pred", "--slice", "64", "--overlap", "0.999"],
                     "MOS155.png", "--overlap", f"{MAX_TILES_PER_IMAGE:,}")
    assert time.perf_counter() - t0 < 10, "counted, not enumerated"
    assert "tiles" in line and not (tmp_path / "pred").exists() and not partials(tmp_path)


# ---------------------------------------------------------------- 5. a dead tracking server

@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_unreachable_store_fails_in_seconds_before_any_work(command, capsys, monkeypatch, tmp_path, data, weights):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD_STORE)
    argv = {"evaluate": ["evaluate", "--weights", weights, "--data", data],
            "train": ["train", "--model", "skynet", "--data", data, "--epochs", "1", "--imgsz", "256",
                      "--out", tmp_path / "run"]}[command]
    t0 = time.perf_counter()
    run_error(capsys, argv, DEAD_STORE, "unreachable", "--no-track")
    assert time.perf_counter() - t0 < 15
    assert not (tmp_path / "run").exists()


def test_store_dying_mid_run_keeps_the_result(capsys, monkeypatch, data, weights):
    """The store answered the up-front check, then died: the evaluation is printed anyway, then one warning."""
    from rsdet_compress.tracking.mlflow_tracker import Tracker
    monkeypatch.setattr(Tracker, "check", lambda self: self)  # alive at the start...
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD_STORE)     # ...gone by the time the result is logged
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = main(["evaluate", "--weights", str(weights), "--data", str(data), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0 and time.perf_counter() - t0 < 30
    r = json.loads(out.strip().splitlines()[-1])
    assert r["detector"] == "skynet" and "map50" in r
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: MLflow logging") and DEAD_STORE in lines[0], err


# ---------------------------------------------------------------- 6. tracebacks -> one line

@pytest.mark.parametrize("flags,needle", [(["--batch", "0"], "--batch must be >= 1, got 0"),
                                          (["--imgsz", "-64"], "--imgsz must be a positive multiple of 32, got -64"),
                                          (["--imgsz", "0"], "got 0"),  # 0 is an error, not "the default"
                                          (["--imgsz", "100"], "got 100")])
def test_evaluate_bad_sizes_are_one_line(flags, needle, capsys, data, weights):
    run_error(capsys, ["evaluate", "--weights", weights, "--data", data, "--no-track", *flags], needle)


@pytest.mark.parametrize("flags,needle", [(["--imgsz", "0"], "--imgsz"), (["--threads", "0"], "--threads"),
                                          (["--batch", "0"], "--batch"), (["--runs", "0"], "--runs"),
                                          (["--rounds", "0"], "--rounds")])
def test_benchmark_zero_is_an_error(flags, needle, capsys, weights):
    run_error(capsys, ["benchmark", "--weights", weights, "--no-track", *flags], needle)


def test_predict_out_existing_file_or_folder(capsys, tmp_path, kit_dir, weights):
    src = kit_dir / "images" / "MOS155.png"
    as_file = tmp_path / "pred.txt"
    as_file.write_text("keep me")
    run_error(capsys, ["predict", "--weights", weights, "--source", src, "--out", as_file], as_file, "not a folder")
    assert as_file.read_text() == "keep me"
    folder = tmp_path / "pred"
    folder.mkdir()
    (folder / "old.json").write_text("{}")
    run_error(capsys, ["predict", "--weights", weights, "--source", src, "--out", folder], folder, "--overwrite")
    assert [p.name for p in folder.iterdir()] == ["old.json"]
    run_error(capsys, ["predict", "--weights", weights, "--source", kit_dir / "images", "--out",
                       kit_dir / "images" / "pred"], "inside the input")
    assert not partials(tmp_path)


def test_compress_out_existing_folder_leaves_nothing(capsys, tmp_path, weights):
    policy = tmp_path / "p.json"
    assert main(["policy", "--weights", str(weights), "--uniform-bits", "8", "--out", str(policy)]) == 0
    out = tmp_path / "c.pt"
    out.mkdir()
    run_error(capsys, ["compress", "--weights", weights, "--policy", policy, "--out", out], out, "folder")
    assert out.is_dir() and not any(out.iterdir()) and not partials(tmp_path)


# ---------------------------------------------------------------- 4. truncated images in predict

def _truncated(src: Path, dst: Path, keep: float = 0.6) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * keep)])
    return dst


def test_predict_truncated_png_is_one_error(capsys, tmp_path, kit_dir, weights):
    cut = _truncated(kit_dir / "images" / "MOS155.png", tmp_path / "cut.png")
    run_error(capsys, ["predict", "--weights", weights, "--source", cut, "--out", tmp_path / "pred"],
              cut, "truncated")
    assert not (tmp_path / "pred").exists() and not partials(tmp_path)


def test_predict_folder_skips_a_truncated_image_with_a_counted_warning(capsys, tmp_path, kit_dir, weights):
    import cv2
    src = tmp_path / "frames"
    src.mkdir()
    shutil.copy(kit_dir / "images" / "MOS155.png", src / "a.png")
    cv2.imwrite(str(tmp_path / "b.jpg"), cv2.imread(str(kit_dir / "images" / "MOS156.png")))
    _truncated(tmp_path / "b.jpg", src / "b.jpg")
    out = tmp_path / "pred"
    capsys.readouterr()
    rc = main(["predict", "--weights", str(weights), "--source", str(src), "--out", str(out), "--conf", "0.5"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    warn = err.strip().splitlines()
    assert len(warn) == 1 and warn[0].startswith("warning: ") and "b.jpg" in warn[0] and "skipped" in warn[0]
    assert "in 1 image(s)" in stdout and "1 unreadable image(s) skipped" in stdout
    coco = json.loads((out / "detections.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == ["a.png"]
    assert [Path(s["path"]).name for s in coco["info"]["skipped"]] == ["b.jpg"]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "detections.json"]  # nothing drawn for b.jpg
    _truncated(src / "a.png", src / "a.png")  # every image corrupt: an error, and no output at all
    run_error(capsys, ["predict", "--weights", weights, "--source", src, "--out", tmp_path / "none"],
              "none of its 2 images")
    assert not (tmp_path / "none").exists() and not partials(tmp_path)
