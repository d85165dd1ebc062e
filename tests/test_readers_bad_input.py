"""Format readers given bad input, on real KIT/Airbus copies and written images: malformed labels,
corrupt images, degenerate boxes. Each is a UserError naming the file (and line), or a counted warning."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from rawdata import (
    KIT_IMAGES,
    airbus_csv_rows,
    copy_airbus,
    copy_fixture,
    copy_kit,
    label_line_count,
    make_yolo_set,
    write_airbus_csv,
    write_corrupt,
    write_jpg,
    write_png,
)

from rsdet_compress.data.readers import READERS, read_dataset
from rsdet_compress.data.record import Box
from rsdet_compress.errors import UserError


@pytest.fixture
def kit_copy(kit_dir: Path, tmp_path: Path) -> Path:
    """The first 3 real KIT images with their labels and classes.txt, in tmp_path."""
    return copy_kit(kit_dir, tmp_path / "kit3", KIT_IMAGES[:3])


@pytest.fixture
def airbus_small(airbus_dir: Path, tmp_path: Path) -> Path:
    """Two real Airbus images (train/) and a CSV with only their rows, in tmp_path."""
    return copy_airbus(airbus_dir, tmp_path / "airbus2")[0]


# ---------------------------------------------------------------- YOLO bad input on real KIT files

def test_kit_copy_reads(kit_copy: Path):
    ds = read_dataset("yolo", kit_copy)
    assert len(ds.images) == 3
    assert sum(len(im.boxes) for im in ds.images) == sum(
        label_line_count(p) for p in (kit_copy / "labels").glob("*.txt"))


def test_yolo_wrong_field_count(kit_copy: Path):
    lbl = sorted((kit_copy / "labels").glob("*.txt"))[1]
    n = label_line_count(lbl)
    lbl.write_text(lbl.read_text() + "0 0.5 0.5 0.1\n")
    with pytest.raises(UserError) as e:
        read_dataset("yolo", kit_copy)
    assert f"{lbl}:{n + 1}" in str(e.value)
    assert "got 4" in str(e.value)
    # too many fields (e.g. a segmentation/OBB row in a detection set) is the same error
    lbl.write_text(lbl.read_text().replace("0 0.5 0.5 0.1\n", "0 0.5 0.5 0.1 0.1 0.9\n"))
    with pytest.raises(UserError) as e:
        read_dataset("yolo", kit_copy)
    assert f"{lbl}:{n + 1}" in str(e.value)
    assert "got 6" in str(e.value)


def test_yolo_non_number(kit_copy: Path):
    lbl = sorted((kit_copy / "labels").glob("*.txt"))[0]
    lines = lbl.read_text().splitlines()
    parts = lines[2].split()
    parts[3] = "0.0x3"
    lines[2] = " ".join(parts)
    lbl.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:
        read_dataset("yolo", kit_copy)
    assert f"{lbl}:3" in str(e.value)


def test_yolo_nan_is_error_not_a_full_image_box(kit_copy: Path):
    lbl = sorted((kit_copy / "labels").glob("*.txt"))[0]
    lbl.write_text("0 nan 0.5 0.1 0.1\n" + lbl.read_text())
    with pytest.raises(UserError) as e:
        read_dataset("yolo", kit_copy)
    assert f"{lbl}:1" in str(e.value)


def test_yolo_class_id_out_of_range(kit_copy: Path):
    lbl = sorted((kit_copy / "labels").glob("*.txt"))[2]
    n = label_line_count(lbl)
    lbl.write_text(lbl.read_text() + "5 0.5 0.5 0.01 0.01\n")  # 5 classes: ids 0..4
    with pytest.raises(UserError) as e:
        read_dataset("yolo", kit_copy)
    assert f"{lbl}:{n + 1}" in str(e.value) and "out of range" in str(e.value)
    lbl.write_text("-1 0.5 0.5 0.01 0.01\n")
    with pytest.raises(UserError) as e:
        read_dataset("yolo", kit_copy)
    assert f"{lbl}:1" in str(e.value)


def test_yolo_missing_label_file(kit_copy: Path):
    lbl = sorted((kit_copy / "labels").glob("*.txt"))[1]
    lbl.unlink()
    with pytest.raises(UserError) as e:
        read_dataset("yolo", kit_copy)
    assert str(lbl) in str(e.value)
    ds = read_dataset("yolo", kit_copy, missing_labels="empty")
    assert len(ds.images) == 3
    rec = next(im for im in ds.images if im.path.stem == lbl.stem)
    assert rec.boxes == []
    assert all(im.boxes for im in ds.images if im is not rec)
    assert ds.warnings["image without label file (background)"] == 1


def test_unknown_format_name(kit_dir: Path):
    with pytest.raises(UserError) as e:
        read_dataset("yolov8-obb", kit_dir)
    msg = str(e.value)
    assert "yolov8-obb" in msg
    for name in ("airbus", "coco", "dota", "voc", "yolo"):
        assert name in msg
    assert set(READERS) == {"airbus", "coco", "dota", "voc", "yolo"}


def test_missing_source_folder(tmp_path: Path):
    with pytest.raises(UserError) as e:
        read_dataset("yolo", tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


# ---------------------------------------------------------------- corrupt images

def test_only_image_corrupt_is_error(tmp_path: Path):
    root = tmp_path / "one"
    (root / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("car\n")
    bad = write_corrupt(root / "images" / "broken.png")
    (root / "labels" / "broken.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(UserError) as e:
        read_dataset("yolo", root)
    assert str(bad) in str(e.value)


def test_few_corrupt_images_skipped_and_counted(tmp_path: Path):
    root = make_yolo_set(tmp_path / "many", {f"img{i:02d}": ((64, 48), "0 0.5 0.5 0.25 0.25\n") for i in range(30)})
    bad = write_corrupt(root / "images" / "zz_broken.png")
    (root / "labels" / "zz_broken.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    ds = read_dataset("yolo", root, max_bad_images=0.05)
    assert len(ds.images) == 30
    assert bad not in {im.path for im in ds.images}
    assert ds.warnings["corrupt image skipped"] == 1
    assert sum(len(im.boxes) for im in ds.images) == 30
    # with no tolerance the same set fails, naming the bad file
    with pytest.raises(UserError) as e:
        read_dataset("yolo", root, max_bad_images=0.0)
    assert str(bad) in str(e.value)
    # two bad of 32 is above 5 %
    write_corrupt(root / "images" / "zz_broken2.png")
    with pytest.raises(UserError):
        read_dataset("yolo", root, max_bad_images=0.05)


def test_corrupt_image_in_dota_and_voc_sets(tmp_path: Path):
    src = copy_fixture("dota", tmp_path)
    write_png(src / "images" / "P0001.png", (400, 400))
    bad = write_corrupt(src / "images" / "P0002.png")
    with pytest.raises(UserError) as e:  # 1 bad of 2 > 5 %
        read_dataset("dota", src)
    assert str(bad) in str(e.value)
    vsrc = copy_fixture("voc", tmp_path)
    vbad = write_corrupt(vsrc / "JPEGImages" / "img1.jpg")
    with pytest.raises(UserError) as e:
        read_dataset("voc", vsrc)
    assert str(vbad) in str(e.value)


# ---------------------------------------------------------------- box sanitising

def test_degenerate_boxes_skipped_and_counted(tmp_path: Path):
    label = ("0 0.5 0.5 0.2 0.2\n"        # good
             "0 0.5 0.5 0.0 0.2\n"        # zero width
             "1 0.3 0.3 0.2 0.0\n"        # zero height
             "1 0.3 0.3 -0.1 0.2\n")      # negative width
    root = make_yolo_set(tmp_path / "degen", {"a": ((200, 100), label)})
    ds = read_dataset("yolo", root)
    (rec,) = ds.images
    assert rec.boxes == [Box(80.0, 40.0, 120.0, 60.0, 0)]
    assert ds.warnings["degenerate box skipped"] == 3


def test_box_outside_skipped_partly_outside_clipped(tmp_path: Path):
    label = ("0 1.5 0.5 0.1 0.1\n"        # fully right of the image
             "1 0.5 -0.5 0.2 0.2\n"       # fully above
             "0 0.95 0.5 0.2 0.2\n"       # x 170..210 on a 200 px image -> clipped at 200
             "1 0.05 0.05 0.2 0.2\n")     # x -10..30, y -5..15 -> clipped at 0
    root = make_yolo_set(tmp_path / "out", {"a": ((200, 100), label)})
    ds = read_dataset("yolo", root)
    (rec,) = ds.images
    assert [(b.x1, b.y1, b.x2, b.y2, b.cls) for b in rec.boxes] == [
        pytest.approx((170.0, 40.0, 200.0, 60.0, 0)),
        pytest.approx((0.0, 0.0, 30.0, 15.0, 1)),
    ]
    assert ds.warnings["out-of-image box skipped"] == 2
    assert ds.warnings["box clipped to image"] == 2
    assert "degenerate box skipped" not in ds.warnings


def test_voc_degenerate_and_outside(tmp_path: Path):
    src = copy_fixture("voc", tmp_path)
    write_jpg(src / "JPEGImages" / "img1.jpg", (320, 240))
    xml = src / "Annotations" / "img1.xml"
    text = xml.read_text()
    text = text.replace("<xmax>110</xmax>", "<xmax>5</xmax>")            # ship: xmax < xmin
    text = text.replace("<ymin>100</ymin>", "<ymin>300</ymin>")          # airplane: below the image
    text = text.replace("<ymax>230.5</ymax>", "<ymax>330</ymax>")
    xml.write_text(text)
    ds = read_dataset("voc", src)
    assert ds.images[0].boxes == []
    assert ds.warnings == Counter({"degenerate box skipped": 1, "out-of-image box skipped": 1})


# ---------------------------------------------------------------- airbus bad input

def test_airbus_small_copy_reads(airbus_small: Path):
    ds = read_dataset("airbus", airbus_small)
    rows = airbus_csv_rows(airbus_small)
    assert len(ds.images) == 2
    assert sum(len(im.boxes) for im in ds.images) == len(rows)


def test_airbus_malformed_geometry(airbus_small: Path):
    rows = airbus_csv_rows(airbus_small)
    rows[4]["geometry"] = "[(135, 522), (245, abc), (245, 600), (135, 600), (135, 522)]"
    csv_path = airbus_small / "annotations.csv"
    write_airbus_csv(csv_path, rows)
    with pytest.raises(UserError) as e:
        read_dataset("airbus", airbus_small)
    assert f"{csv_path}:6" in str(e.value)  # header is line 1, rows[4] is line 6
    rows[4]["geometry"] = "POLYGON ((135 522, 245 522, 245 600, 135 600))"
    write_airbus_csv(csv_path, rows)
    with pytest.raises(UserError) as e:
        read_dataset("airbus", airbus_small)
    assert f"{csv_path}:6" in str(e.value)


def test_airbus_row_names_missing_image(airbus_small: Path):
    rows = airbus_csv_rows(airbus_small)
    extra = dict(rows[0], id="99999", image_id="does-not-exist.jpg")
    rows.append(extra)
    csv_path = airbus_small / "annotations.csv"
    write_airbus_csv(csv_path, rows)
    with pytest.raises(UserError) as e:
        read_dataset("airbus", airbus_small)
    msg = str(e.value)
    assert f"{csv_path}:{len(rows) + 1}" in msg and "does-not-exist.jpg" in msg


def test_airbus_image_only_in_extras_is_not_used(airbus_small: Path):
    rows = airbus_csv_rows(airbus_small)
    name = rows[0]["image_id"]
    (airbus_small / "extras").mkdir()
    shutil.move(str(airbus_small / "train" / name), str(airbus_small / "extras" / name))
    with pytest.raises(UserError) as e:
        read_dataset("airbus", airbus_small)
    assert name in str(e.value)


def test_airbus_unannotated_image_ignored_and_counted(airbus_small: Path):
    write_jpg(airbus_small / "valid" / "no-rows.jpg", (64, 64))
    ds = read_dataset("airbus", airbus_small)
    assert len(ds.images) == 2
    assert ds.warnings["image without annotation rows ignored"] == 1


def test_airbus_polygon_point_order_does_not_matter(airbus_small: Path):
    rows = airbus_csv_rows(airbus_small)
    # the same rectangle starting from the bottom-right corner, and counter-clockwise from top-right
    rows[0]["geometry"] = "[(245, 600), (135, 600), (135, 522), (245, 522), (245, 600)]"
    rows[1]["geometry"] = "[(245.5, 522), (135, 522), (135, 600.25), (245.5, 600.25), (245.5, 522)]"
    write_airbus_csv(airbus_small / "annotations.csv", rows)
    ds = read_dataset("airbus", airbus_small)
    rec = next(im for im in ds.images if im.path.name == rows[0]["image_id"])
    cls0 = ds.classes.index(rows[0]["class"])
    cls1 = ds.classes.index(rows[1]["class"])
    assert rec.boxes[0] == Box(135, 522, 245, 600, cls0)
    assert rec.boxes[1] == Box(135, 522, 245.5, 600.25, cls1)


def test_airbus_user_class_order(airbus_small: Path):
    rows = airbus_csv_rows(airbus_small)
    ds = read_dataset("airbus", airbus_small, classes=["Truncated_airplane", "Airplane", "Helicopter"])
    assert ds.classes == ["Truncated_airplane", "Airplane", "Helicopter"]
    want = Counter(r["class"] for r in rows)
    assert ds.box_count() == want
    first = next(im for im in ds.images if im.path.name == rows[0]["image_id"])
    assert first.boxes[0].cls == ds.classes.index(rows[0]["class"])
    with pytest.raises(UserError) as e:  # a CSV class missing from the given list
        read_dataset("airbus", airbus_small, classes=["Helicopter"])
    assert str(airbus_small / "annotations.csv") in str(e.value)
