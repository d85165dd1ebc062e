"""``data prepare`` on the real airbus and KIT data: layout, labels, COCO JSON, split hygiene."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import cv2
import pytest

from rsdet_compress.data.config import load_data_config
from rsdet_compress.data.prepare import PrepareConfig, prepare
from rsdet_compress.errors import UserError

FIRST_PLANE = "4f833867-273e-4d73-8bc3-cb2d9ceb54ef"  # first CSV row: [(135, 522) ... (245, 600)]


@pytest.fixture(scope="module")
def airbus_prepared(airbus_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("airbus") / "prepared"
    prepare(PrepareConfig(format="airbus", src=str(airbus_dir), out=str(out), tile=640, overlap=0.2,
                          rescale=0.5, keep_empty=1.0, seed=0), progress=False)
    return out


def _coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def test_layout_and_yaml(airbus_prepared: Path):
    cfg = load_data_config(airbus_prepared / "data.yaml")
    assert cfg.names == ["Airplane", "Truncated_airplane"]
    assert cfg.rescale == 0.5
    for split in ("train", "val", "test"):
        chips = sorted(p.name for p in cfg.split_images(split).iterdir())
        coco = _coco(airbus_prepared, split)
        assert chips == sorted(im["file_name"] for im in coco["images"])
        labels = sorted(p.stem for p in (airbus_prepared / "labels" / split).glob("*.txt"))
        assert labels == sorted(Path(c).stem for c in chips)
    # 2560 px scenes at 0.5 -> 1280 px -> 3 x 3 chips of 640 with 20% overlap, all kept (keep_empty=1).
    summary = json.loads((airbus_prepared / "summary.json").read_text())
    assert sum(summary["tiles"].values()) == 103 * 9
    assert sum(summary["source_images"].values()) == 103


def test_ultralytics_accepts_the_yaml(airbus_prepared: Path):
    from ultralytics.data.utils import check_det_dataset
    data = check_det_dataset(str(airbus_prepared / "data.yaml"))
    assert data["nc"] == 2 and Path(data["val"]).is_dir()


def test_no_source_image_in_two_splits(airbus_prepared: Path):
    seen = defaultdict(set)
    for split in ("train", "val", "test"):
        for im in _coco(airbus_prepared, split)["images"]:
            seen[im["source_image"]].add(split)
    assert len(seen) == 103
    assert all(len(s) == 1 for s in seen.values())


def test_known_plane_lands_in_its_chip(airbus_prepared: Path):
    split = next(s for s in ("train", "val", "test")
                 if any(im["source_image"] == FIRST_PLANE for im in _coco(airbus_prepared, s)["images"]))
    coco = _coco(airbus_prepared, split)
    chip = next(im for im in coco["images"] if im["source_image"] == FIRST_PLANE
                and im["tile_x"] == 0 and im["tile_y"] == 0)
    boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == chip["id"]]
    assert [67.5, 261.0, 55.0, 39.0] in boxes  # (135, 522, 245, 600) halved, as x, y, w, h
    # the YOLO label carries the same box, normalised by the 640 px chip
    label = (airbus_prepared / "labels" / split / f"{Path(chip['file_name']).stem}.txt").read_text()
    rows = [[float(v) for v in ln.split()] for ln in label.splitlines()]
    assert any(r == pytest.approx([0, 95 / 640, 280.5 / 640, 55 / 640, 39 / 640], abs=1e-6) for r in rows)
    im = cv2.imread(str(airbus_prepared / "images" / split / chip["file_name"]))
    assert im.shape == (640, 640, 3)


def test_labels_match_coco(airbus_prepared: Path):
    coco = _coco(airbus_prepared, "val")
    per_image = defaultdict(list)
    for a in coco["annotations"]:
        per_image[a["image_id"]].append(a)
    for im in coco["images"]:
        lines = (airbus_prepared / "labels" / "val" / f"{Path(im['file_name']).stem}.txt").read_text().split("\n")
        lines = [ln for ln in lines if ln]
        assert len(lines) == len(per_image[im["id"]])
        for ln, a in zip(lines, per_image[im["id"]]):
            c, xc, yc, w, h = ln.split()
            assert int(c) + 1 == a["category_id"]
            assert float(w) * im["width"] == pytest.approx(a["bbox"][2], abs=0.02)
            assert float(xc) * im["width"] == pytest.approx(a["bbox"][0] + a["bbox"][2] / 2, abs=0.02)


def test_same_seed_same_output_and_empty_sampling(kit_dir: Path, tmp_path: Path):
    kw = dict(format="yolo", src=str(kit_dir), tile=256, overlap=0.0, keep_empty=0.0, seed=3)
    prepare(PrepareConfig(out=str(tmp_path / "a"), **kw), progress=False)
    prepare(PrepareConfig(out=str(tmp_path / "b"), **kw), progress=False)
    for split in ("train", "val", "test"):
        assert _coco(tmp_path / "a", split) == _coco(tmp_path / "b", split)
    train = _coco(tmp_path / "a", "train")
    with_boxes = {a["image_id"] for a in train["annotations"]}
    assert {im["id"] for im in train["images"]} == with_boxes  # keep_empty=0: no empty train chips


def test_existing_output_refused_and_failure_leaves_nothing(kit_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="exists"):
        prepare(PrepareConfig(format="yolo", src=str(kit_dir), out=str(out)), progress=False)
    # a bad row in one label file: error, and no output or temp folder left behind
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    (src / "classes.txt").write_text((kit_dir / "classes.txt").read_text())
    for name in ("MOS155", "MOS156"):
        (src / "images" / f"{name}.png").write_bytes((kit_dir / "images" / f"{name}.png").read_bytes())
        (src / "labels" / f"{name}.txt").write_text((kit_dir / "labels" / f"{name}.txt").read_text())
    (src / "labels" / "MOS156.txt").write_text("0 0.5 0.5 0.1\n")
    target = tmp_path / "prepared"
    with pytest.raises(UserError, match=r"MOS156.txt:1"):
        prepare(PrepareConfig(format="yolo", src=str(src), out=str(target)), progress=False)
    assert not target.exists()
    # no partial folder left; only the (empty) lock file, kept by design (see atomic._lock)
    assert [p.name for p in tmp_path.glob(".prepared*")] == [".prepared.lock"]


@pytest.mark.parametrize("field,value", [("tile", 8), ("overlap", 1.0), ("rescale", 0.0),
                                         ("split", (0.5, 0.5, 0.5)), ("missing_labels", "maybe")])
def test_bad_settings_are_rejected(kit_dir: Path, tmp_path: Path, field: str, value):
    cfg = PrepareConfig(format="yolo", src=str(kit_dir), out=str(tmp_path / "o"))
    setattr(cfg, field, value)
    with pytest.raises(UserError):
        prepare(cfg, progress=False)
