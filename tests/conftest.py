"""Shared fixtures: where the real data lives, and a quiet, offline ultralytics."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")  # never let ultralytics reach for the network
REPO = Path(__file__).resolve().parents[1]
# The real data sets live beside the checkout (../shared/data) unless RSDET_DATA says otherwise.
os.environ.setdefault("RSDET_DATA", str(REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["RSDET_DATA"])
    assert (root / "airbus-aircraft" / "annotations.csv").is_file(), (
        f"real data not found under {root}; set RSDET_DATA to the folder holding airbus-aircraft/")
    return root


@pytest.fixture(scope="session")
def airbus_dir(data_root: Path) -> Path:
    return data_root / "airbus-aircraft"


@pytest.fixture(scope="session")
def kit_dir(data_root: Path) -> Path:
    return data_root / "kit-aerial-cars"


@pytest.fixture(scope="session")
def kit_names(kit_dir: Path) -> list[str]:
    """The five KIT class names, in label order."""
    return [ln.strip() for ln in (kit_dir / "classes.txt").read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="session")
def tiny_data(kit_dir: Path, tmp_path_factory) -> Path:
    """Real KIT aerial cars, cut into 256 px chips: a small prepared data set (data.yaml path)."""
    from rsdet_compress.data.prepare import PrepareConfig, prepare
    out = tmp_path_factory.mktemp("prepared") / "kit"
    prepare(PrepareConfig(format="yolo", src=str(kit_dir), out=str(out), tile=256, overlap=0.0,
                          keep_empty=0.0, seed=0), progress=False)
    return out / "data.yaml"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine, thread contention costs more than it gains."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Every test logs to its own throwaway MLflow store and runs folder, never to ./runs."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RSDET_RUNS", str(tmp_path / "runs"))


@pytest.fixture(scope="session")
def small_airbus(airbus_dir: Path, tmp_path_factory) -> Path:
    """Real airbus scenes at quarter resolution in 320 px chips (configs/airbus-small-prepare.yaml)."""
    from rsdet_compress.config import load_config
    from rsdet_compress.data.prepare import PrepareConfig, prepare
    cache = os.environ.get("RSDET_TEST_CACHE")  # developer speed-up: reuse across pytest sessions (CI: unset)
    if cache and (Path(cache) / "airbus-small" / "data.yaml").is_file():
        return Path(cache) / "airbus-small" / "data.yaml"
    out = Path(cache) / "airbus-small" if cache else tmp_path_factory.mktemp("prepared") / "airbus-small"
    cfg = load_config(REPO / "configs" / "airbus-small-prepare.yaml", PrepareConfig, out=str(out))
    prepare(cfg, progress=False)
    return out / "data.yaml"


@pytest.fixture(scope="session")
def trained_yolov8n(small_airbus: Path, tmp_path_factory) -> Path:
    """A YOLOv8n really trained on real chips (configs/airbus-small-yolov8n.yaml, ~4.5 min on 2 cores).

    Its val mAP50 is ~0.4: high enough that a broken quantizer or pruner shows as an mAP drop.
    """
    import torch

    from rsdet_compress.config import load_config
    from rsdet_compress.engine.trainer import TrainConfig, train
    cache = os.environ.get("RSDET_TEST_CACHE")  # developer speed-up: reuse across pytest sessions (CI: unset)
    if cache and (Path(cache) / "yolov8n-small" / "weights" / "best.pt").is_file():
        return Path(cache) / "yolov8n-small" / "weights" / "best.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # other test modules pin 1 thread
    try:
        out = Path(cache) / "yolov8n-small" if cache else tmp_path_factory.mktemp("trained") / "yolov8n-small"
        cfg = load_config(REPO / "configs" / "airbus-small-yolov8n.yaml", TrainConfig, data=str(small_airbus),
                          out=str(out), verbose=False, track=False)
        result = train(cfg)
    finally:
        torch.set_num_threads(threads)
    return Path(result["weights"])
