"""Shared fixtures: where the real data lives, and a quiet, offline ultralytics."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

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
