"""Format readers: real data (Airbus CSV, KIT YOLO), hand-written DOTA/VOC/COCO fixtures,
and bad input that must fail with a UserError naming the file (and line)."""
from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from rsdet_compress.data.readers import READERS, read_dataset
from rsdet_compress.data.record import Box
from rsdet_compress.errors import UserError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
AIRBUS_FIRST_IMAGE = "4f833867-273e-4d73-8bc3-cb2d9ceb54ef.jpg"


# ---------------------------------------------------------------- helpers

def write_png(path: Path, size: tuple[int, int], color=(90, 120, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_jpg(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (40, 40, 40)).save(path, format="JPEG")
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image, just some bytes\x00\x01\x02" * 10)
    return path


def copy_fixture(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def make_yolo_set(root: Path, images: dict[str, tuple[tuple[int, int], str]],
                  classes=("car", "truck")) -> Path:
    """images: name -> ((w, h), label text). Writes images/, labels/, classes.txt."""
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for name, (size, label) in images.items():
        write_png(root / "images" / f"{name}.png", size)
        (root / "labels" / f"{name}.txt").write_text(label)
    return root


@pytest.fixture
def kit_copy(kit_dir: Path, tmp_path: Path) -> Path:
    """The first 3 real KIT images with their labels and classes.txt, in tmp_path."""
    dst = tmp_path / "kit3"
    (dst / "images").mkdir(parents=True)
    (dst / "labels").mkdir()
    shutil.copy(kit_dir / "classes.txt", dst / "classes.txt")
    for img in sorted((kit_dir / "images").glob("*.png"))[:3]:
        shutil.copy(img, dst / "images" / img.name)
        shutil.copy(kit_dir / "labels" / f"{img.stem}.txt", dst / "labels" / f"{img.stem}.txt")
    return dst


def label_line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def airbus_csv_rows(airbus_dir: Path) -> list[dict]:
    with (airbus_dir / "annotations.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def airbus_small(airbus_dir: Path, tmp_path: Path) -> Path:
    """Two real Airbus images (train/) and a CSV with only their rows, in tmp_path."""
    rows = airbus_csv_rows(airbus_dir)
    names = sorted({r["image_id"] for r in rows})[:2]
    dst = tmp_path / "airbus2"
    (dst / "train").mkdir(parents=True)
    for n in names:
        src = next(airbus_dir.rglob(n))
        shutil.copy(src, dst / "train" / n)
    keep = [r for r in rows if r["image_id"] in names]
    write_airbus_csv(dst / "annotations.csv", keep)
    return dst


def write_airbus_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image_id", "geometry", "class"])
        w.writeheader()
        w.writerows(rows)


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
