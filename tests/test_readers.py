"""Format readers on real data (Airbus CSV, KIT YOLO) and the hand-written DOTA/VOC/COCO fixtures:
what they read, and each format's own errors (a UserError naming the file, and line)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from rawdata import airbus_csv_rows, copy_fixture, label_line_count, write_jpg, write_png

from rsdet_compress.data.readers import read_dataset
from rsdet_compress.data.record import Box
from rsdet_compress.errors import UserError

AIRBUS_FIRST_IMAGE = "4f833867-273e-4d73-8bc3-cb2d9ceb54ef.jpg"


# ---------------------------------------------------------------- airbus, real data

@pytest.fixture(scope="module")
def airbus_set(airbus_dir: Path):
    return read_dataset("airbus", airbus_dir)


def test_airbus_images_and_classes(airbus_set, airbus_dir: Path):
    assert len(airbus_set.images) == 103
    assert airbus_set.classes == ["Airplane", "Truncated_airplane"]
    on_disk = {p.name for d in ("train", "valid") for p in (airbus_dir / d).glob("*.jpg")}
    assert len(on_disk) == 103
    assert {im.path.name for im in airbus_set.images} == on_disk
    # every record points at a real file under train/ or valid/
    for im in airbus_set.images:
        assert im.path.is_file()
        assert im.path.parent.name in ("train", "valid")


def test_airbus_extras_not_included(airbus_set, airbus_dir: Path):
    extras = {p.name for p in (airbus_dir / "extras").iterdir()}
    assert len(extras) == 6
    names = {im.path.name for im in airbus_set.images}
    assert not names & extras
    assert all("extras" not in im.path.parts for im in airbus_set.images)


def test_airbus_box_counts_match_csv(airbus_set, airbus_dir: Path):
    rows = airbus_csv_rows(airbus_dir)
    per_class = Counter(r["class"] for r in rows)
    assert per_class == {"Airplane": 3316, "Truncated_airplane": 109}  # as the README says
    assert airbus_set.box_count() == per_class
    per_image = Counter(r["image_id"] for r in rows)
    assert {im.path.name: len(im.boxes) for im in airbus_set.images} == dict(per_image)


def test_airbus_known_row_and_sizes(airbus_set, airbus_dir: Path):
    first = airbus_csv_rows(airbus_dir)[0]
    assert first["image_id"] == AIRBUS_FIRST_IMAGE
    assert first["geometry"] == "[(135, 522), (245, 522), (245, 600), (135, 600), (135, 522)]"
    rec = next(im for im in airbus_set.images if im.path.name == AIRBUS_FIRST_IMAGE)
    assert rec.boxes[0] == Box(135, 522, 245, 600, 0)
    assert rec.boxes[0].difficult is False
    assert (rec.width, rec.height) == (2560, 2560)
    with Image.open(rec.path) as im:
        assert im.size == (2560, 2560)
    assert {(im.width, im.height) for im in airbus_set.images} == {(2560, 2560)}
    # boxes stay inside their image after sanitising
    for im in airbus_set.images:
        for b in im.boxes:
            assert 0 <= b.x1 < b.x2 <= im.width and 0 <= b.y1 < b.y2 <= im.height


def test_airbus_truncated_class_index(airbus_set, airbus_dir: Path):
    row = next(r for r in airbus_csv_rows(airbus_dir) if r["class"] == "Truncated_airplane")
    rec = next(im for im in airbus_set.images if im.path.name == row["image_id"])
    assert any(b.cls == 1 for b in rec.boxes)


# ---------------------------------------------------------------- yolo, real KIT data

@pytest.fixture(scope="module")
def kit_set(kit_dir: Path):
    return read_dataset("yolo", kit_dir)


def test_yolo_kit_images_classes_counts(kit_set, kit_dir: Path):
    assert len(kit_set.images) == 65
    names = [ln.strip() for ln in (kit_dir / "classes.txt").read_text().splitlines() if ln.strip()]
    assert names == ["car", "truck", "bus", "minibus", "cyclist"]
    assert kit_set.classes == names
    lines = [ln for p in (kit_dir / "labels").glob("*.txt") for ln in p.read_text().splitlines() if ln.strip()]
    assert sum(len(im.boxes) for im in kit_set.images) == len(lines) == 2593
    by_class = Counter(names[int(ln.split()[0])] for ln in lines)
    assert kit_set.box_count() == by_class == {"car": 2546, "bus": 25, "minibus": 22}


def test_yolo_kit_box_converted_to_pixels(kit_set, kit_dir: Path):
    label = kit_dir / "labels" / "MOS155.txt"
    assert label.read_text().splitlines()[0] == (
        "0 0.020833333333333332 0.6370441860465116 0.019259523809523806 0.04493581395348837")
    with Image.open(kit_dir / "images" / "MOS155.png") as im:
        assert im.size == (1764, 430)
    rec = next(im for im in kit_set.images if im.path.name == "MOS155.png")
    assert (rec.width, rec.height) == (1764, 430)
    b = rec.boxes[0]
    # by hand: x1 = (0.0208333 - 0.0192595 / 2) * 1764 = 19.763, y1 = (0.637044 - 0.0449358 / 2) * 430 ...
    assert (b.x1, b.y1, b.x2, b.y2) == pytest.approx((19.7631, 264.2678, 53.7369, 283.5902), abs=1e-3)
    assert b.cls == 0
    assert len(rec.boxes) == label_line_count(label)


# ---------------------------------------------------------------- DOTA fixture

def test_dota_quads_difficult_and_classes(tmp_path: Path):
    src = copy_fixture("dota", tmp_path)
    write_png(src / "images" / "P0001.png", (400, 400))
    write_png(src / "images" / "P0002.png", (100, 80))
    ds = read_dataset("dota", src)
    assert ds.classes == ["harbor", "plane", "small-vehicle"]  # sorted names, not order of appearance
    assert [im.path.name for im in ds.images] == ["P0001.png", "P0002.png"]
    p1, p2 = ds.images
    assert (p1.width, p1.height) == (400, 400)
    assert p1.boxes == [
        Box(80.0, 50.0, 180.0, 150.0, 1, False),    # oriented quad -> its axis-aligned bounds
        Box(300.0, 300.0, 340.0, 320.0, 2, True),   # difficult=1 kept
        Box(10.0, 380.0, 60.0, 400.0, 0, False),    # y 380..420 clipped to the 400 px image
    ]
    assert p2.boxes == [Box(20.0, 20.0, 60.0, 40.0, 2, False)]
    assert ds.warnings["box clipped to image"] == 1
    assert ds.box_count() == {"plane": 1, "small-vehicle": 2, "harbor": 1}


def test_dota_user_class_order(tmp_path: Path):
    src = copy_fixture("dota", tmp_path)
    write_png(src / "images" / "P0001.png", (400, 400))
    write_png(src / "images" / "P0002.png", (100, 80))
    ds = read_dataset("dota", src, classes=["small-vehicle", "plane", "harbor"])
    assert ds.classes == ["small-vehicle", "plane", "harbor"]
    assert [b.cls for b in ds.images[0].boxes] == [1, 0, 2]


def test_dota_seven_numbers_is_error_with_line(tmp_path: Path):
    src = copy_fixture("dota", tmp_path)
    write_png(src / "images" / "P0001.png", (400, 400))
    write_png(src / "images" / "P0002.png", (100, 80))
    lbl = src / "labelTxt" / "P0002.txt"
    # 7 numbers + class + difficult (9 fields) on line 4, then 7 numbers + class (8 fields)
    lbl.write_text(lbl.read_text() + "1 2 3 4 5 6 7 plane 0\n")
    with pytest.raises(UserError) as e:
        read_dataset("dota", src)
    assert f"{lbl}:4" in str(e.value)
    lbl.write_text("imagesource:GoogleEarth\n1 2 3 4 5 6 7 plane\n")
    with pytest.raises(UserError) as e:
        read_dataset("dota", src)
    assert f"{lbl}:2" in str(e.value)


def test_dota_unknown_class_is_error(tmp_path: Path):
    src = copy_fixture("dota", tmp_path)
    write_png(src / "images" / "P0001.png", (400, 400))
    write_png(src / "images" / "P0002.png", (100, 80))
    with pytest.raises(UserError) as e:
        read_dataset("dota", src, classes=["plane", "small-vehicle"])
    assert f"{src / 'labelTxt' / 'P0001.txt'}:5" in str(e.value)
    assert "harbor" in str(e.value)


# ---------------------------------------------------------------- VOC fixture

def test_voc_bndbox_difficult_classes(tmp_path: Path):
    src = copy_fixture("voc", tmp_path)
    write_jpg(src / "JPEGImages" / "img1.jpg", (320, 240))
    ds = read_dataset("voc", src)
    assert ds.classes == ["airplane", "ship"]
    (rec,) = ds.images
    assert rec.path == src / "JPEGImages" / "img1.jpg"
    assert (rec.width, rec.height) == (320, 240)
    assert rec.boxes == [Box(10.0, 20.0, 110.0, 80.0, 1, False), Box(150.5, 100.0, 200.0, 230.5, 0, True)]
    assert not ds.warnings


def test_voc_xml_parse_error(tmp_path: Path):
    src = copy_fixture("voc", tmp_path)
    write_jpg(src / "JPEGImages" / "img1.jpg", (320, 240))
    bad = src / "Annotations" / "img2.xml"
    bad.write_text("<annotation>\n  <filename>img1.jpg</filename>\n  <object><name>ship</name>\n</annotation>\n")
    with pytest.raises(UserError) as e:
        read_dataset("voc", src)
    assert str(bad) in str(e.value)


def test_voc_non_numeric_bndbox(tmp_path: Path):
    src = copy_fixture("voc", tmp_path)
    write_jpg(src / "JPEGImages" / "img1.jpg", (320, 240))
    xml = src / "Annotations" / "img1.xml"
    xml.write_text(xml.read_text().replace("<xmin>10</xmin>", "<xmin>ten</xmin>"))
    with pytest.raises(UserError) as e:
        read_dataset("voc", src)
    assert str(xml) in str(e.value) and "object #1" in str(e.value)


# ---------------------------------------------------------------- COCO fixture

def _coco_images(src: Path) -> None:
    write_png(src / "images" / "a.png", (200, 100))
    write_png(src / "images" / "b.png", (200, 100))


def test_coco_xywh_to_xyxy_and_class_order(tmp_path: Path):
    src = copy_fixture("coco", tmp_path)
    _coco_images(src)
    ds = read_dataset("coco", src)
    assert ds.classes == ["storage-tank", "vehicle"]  # ordered by category id, not listing order
    assert [im.path.name for im in ds.images] == ["a.png", "b.png"]
    a, b = ds.images
    assert (a.width, a.height) == (200, 100)
    assert a.boxes == [
        Box(10.0, 20.0, 40.0, 60.0, 1, False),     # [10, 20, 30, 40] xywh
        Box(100.5, 5.0, 150.5, 30.5, 0, True),     # iscrowd -> difficult
    ]
    assert b.boxes == []
    # the JSON file itself works as src too
    assert read_dataset("coco", src / "annotations.json").images[0].boxes == a.boxes


def test_coco_invalid_json(tmp_path: Path):
    src = copy_fixture("coco", tmp_path)
    _coco_images(src)
    path = src / "annotations.json"
    path.write_text('{\n  "images": [\n    {"id": 1, "file_name": "a.png",}\n')
    with pytest.raises(UserError) as e:
        read_dataset("coco", src)
    assert str(path) in str(e.value)


def test_coco_top_level_not_object(tmp_path: Path):
    # e.g. a COCO *results* file (a list of detections) given by mistake
    src = copy_fixture("coco", tmp_path)
    _coco_images(src)
    path = src / "annotations.json"
    path.write_text(json.dumps([{"image_id": 7, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.9}]))
    with pytest.raises(UserError) as e:
        read_dataset("coco", src)
    assert str(path) in str(e.value)


def test_coco_unknown_category(tmp_path: Path):
    src = copy_fixture("coco", tmp_path)
    _coco_images(src)
    path = src / "annotations.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["category_id"] = 42
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        read_dataset("coco", src)
    assert str(path) in str(e.value) and "annotations[1]" in str(e.value)


def test_coco_nan_bbox_is_error(tmp_path: Path):
    src = copy_fixture("coco", tmp_path)
    _coco_images(src)
    path = src / "annotations.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["bbox"] = [10, float("nan"), 30, 40]
    path.write_text(json.dumps(data))  # Python writes NaN, and json.loads accepts it
    with pytest.raises(UserError) as e:
        read_dataset("coco", src)
    assert str(path) in str(e.value) and "annotations[0]" in str(e.value)
