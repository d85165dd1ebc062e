"""Issue 15, data side: every bad input to ``data prepare`` ends in one ``error:`` line and exit
code 2, or a counted warning; never a traceback, lost data, a wrong result or a half-written output.

All on real files (KIT aerial cars, Airbus aircraft) copied into tmp_path, through the CLI in-process,
at quarter resolution so the whole module runs in well under a minute on two cores.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import run_error
from PIL import Image
from rawdata import copy_airbus, copy_kit, write_airbus_csv

from rsdet_compress.cli.main import main
from rsdet_compress.data.imageio import CorruptImage, image_size, read_image

FAST = ["--tile", "256", "--overlap", "0", "--rescale", "0.25", "--seed", "0", "--quiet"]
ALL_TRAIN = ["--split", "1,0,0"]


# ---------------------------------------------------------------- helpers

def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha1 of every file under ``folder`` (to prove nothing changed)."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_ok(capsys, argv: list) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, f"exit {rc}: {err}"
    return out


def assert_no_output(parent: Path, name: str) -> None:
    """Neither the output nor a partial folder of it exists (the lock file is kept by design)."""
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.endswith(".partial")]


def kit(dst: Path, kit_dir: Path, names=("MOS155",), layout: dict[str, str] | None = None) -> Path:
    """Real KIT images + labels + classes.txt (one scene unless told); ``layout`` renames or nests them."""
    return copy_kit(kit_dir, dst, names, layout)


def prep(fmt: str, src: Path, out: Path, *extra) -> list:
    return ["data", "prepare", "--format", fmt, "--src", src, "--out", out, *FAST, *extra]


def coco_json(root: Path) -> dict:
    return {s: json.loads((root / "annotations" / f"{s}.json").read_text()) for s in ("train", "val", "test")}


# ---------------------------------------------------------------- 1. raw data never deleted

@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_out_over_src_refused_and_source_kept(capsys, kit_dir, tmp_path, where):
    src = kit(tmp_path / "raw" / "kit", kit_dir)
    before = snapshot(tmp_path)
    out = {"same": src, "parent": src.parent, "inside": src / "prepared"}[where]
    run_error(capsys, prep("yolo", src, out, "--overwrite", *ALL_TRAIN), str(out), "input")
    assert snapshot(tmp_path) == before  # nothing deleted, nothing written, not even a lock file


def test_classes_file_protected_too(capsys, kit_dir, tmp_path):
    src = kit(tmp_path / "kit", kit_dir)
    classes = tmp_path / "lists" / "classes.txt"
    classes.parent.mkdir()
    shutil.copy(src / "classes.txt", classes)
    run_error(capsys, prep("yolo", src, tmp_path / "lists", "--overwrite", "--classes", classes, *ALL_TRAIN),
              "input")
    assert classes.read_text() == (src / "classes.txt").read_text()


# ---------------------------------------------------------------- 2. COCO file_name escaping

@pytest.mark.parametrize("fname", ["../outside/MOS155.png", "/abs/MOS155.png", "sub/../../MOS155.png"])
def test_coco_file_name_outside_refused(capsys, kit_dir, tmp_path, fname):
    (tmp_path / "outside").mkdir()
    shutil.copy(kit_dir / "images" / "MOS155.png", tmp_path / "outside" / "MOS155.png")
    src = tmp_path / "coco"
    src.mkdir()
    ann = src / "instances.json"
    ann.write_text(json.dumps({"images": [{"id": 7, "file_name": fname, "width": 1764, "height": 430}],
                               "annotations": [], "categories": [{"id": 1, "name": "car"}]}))
    run_error(capsys, prep("coco", ann, tmp_path / "out"), str(ann), "image id 7", fname)
    assert_no_output(tmp_path, "out")


# ---------------------------------------------------------------- 3a. chip names unique

def test_same_stem_in_two_folders_keeps_every_chip(capsys, kit_dir, tmp_path):
    src = kit(tmp_path / "kit", kit_dir, names=("MOS155", "MOS156", "MOS157"),
              layout={"MOS155": "north/scene", "MOS156": "south/scene"})
    out = tmp_path / "out"
    run_ok(capsys, prep("yolo", src, out, *ALL_TRAIN, "--keep-empty", "1"))
    summary = json.loads((out / "summary.json").read_text())
    chips = sorted(p.name for p in (out / "images" / "train").iterdir())
    coco = coco_json(out)["train"]
    assert len(chips) == summary["tiles"]["train"] == len(coco["images"]) == 6  # 441 x 108 px: 2 chips each
    assert {"MOS157_0_0.png", "MOS157_185_0.png"} <= set(chips)  # no collision: names as before
    assert {"north__scene_0_0.png", "south__scene_0_0.png"} <= set(chips)
    label_rows = sum(len(p.read_text().splitlines()) for p in (out / "labels" / "train").iterdir())
    assert label_rows == len(coco["annotations"]) == sum(summary["boxes"]["train"].values())


# ---------------------------------------------------------------- 3b. EXIF orientation

def test_exif_rotated_jpeg_keeps_its_boxes(capsys, kit_dir, tmp_path):
    """A photo stored rotated with orientation 6 displays as the original: its (display-frame)
    labels must land on the same pixels as the plain copy's."""
    src = kit(tmp_path / "kit", kit_dir)  # MOS155.png + labels
    original = Image.open(src / "images" / "MOS155.png").convert("RGB")
    (src / "images" / "MOS155.png").unlink()
    original.save(src / "images" / "plain.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored pixels rotated 90 degrees clockwise
    original.transpose(Image.Transpose.ROTATE_90).save(src / "images" / "turned.jpg", quality=95, exif=exif)
    for stem in ("plain", "turned"):
        shutil.copy(kit_dir / "labels" / "MOS155.txt", src / "labels" / f"{stem}.txt")
    (src / "labels" / "MOS155.txt").unlink()
    assert image_size(src / "images" / "turned.jpg") == (1764, 430)
    assert read_image(src / "images" / "turned.jpg").shape == (430, 1764, 3)

    out = tmp_path / "out"
    run_ok(capsys, prep("yolo", src, out, *ALL_TRAIN, "--keep-empty", "1", "--rescale", "0.5"))
    coco = coco_json(out)["train"]
    boxes = {}
    for im in coco["images"]:
        key = (im["source_image"], im["tile_x"], im["tile_y"])
        boxes[key] = sorted(a["bbox"] for a in coco["annotations"] if a["image_id"] == im["id"])
    plain = {k[1:]: v for k, v in boxes.items() if k[0] == "plain"}
    turned = {k[1:]: v for k, v in boxes.items() if k[0] == "turned"}
    assert plain == turned and sum(map(len, plain.values())) >= 45  # 50 labelled cars, a few cut by tiles
    for (x, y) in plain:
        a = read_image(out / "images" / "train" / f"plain_{x}_{y}.jpg").astype(int)
        b = read_image(out / "images" / "train" / f"turned_{x}_{y}.jpg").astype(int)
        assert np.abs(a - b).mean() < 4  # same scene, only JPEG noise apart (rotated: ~60)


# ---------------------------------------------------------------- 4. truncated images

def test_truncated_jpeg_is_corrupt_not_grey_chips(capsys, airbus_dir, tmp_path):
    src, rows = copy_airbus(airbus_dir, tmp_path / "airbus", n=3)
    victim = sorted((src / "train").iterdir())[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(CorruptImage, match="truncated"):
        read_image(victim)
    # 1 bad image of 3 is above the default 5 %: an error naming the file
    run_error(capsys, prep("airbus", src, tmp_path / "out", *ALL_TRAIN), str(victim), "1 of 3")
    assert_no_output(tmp_path, "out")
    # tolerated (max_bad_images 0.5): skipped, counted, none of its chips or boxes written
    cfg = tmp_path / "prep.yaml"
    cfg.write_text("max_bad_images: 0.5\nkeep_empty: 1.0\n")
    out = tmp_path / "out2"
    printed = run_ok(capsys, prep("airbus", src, out, *ALL_TRAIN, "--config", cfg))
    assert "1 x corrupt image skipped" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warnings"]["corrupt image skipped"] == 1 and summary["source_images"]["train"] == 2
    assert victim.stem not in {im["source_image"] for im in coco_json(out)["train"]["images"]}


def test_image_truncated_after_reading_is_counted_while_tiling(capsys, airbus_dir, tmp_path, monkeypatch):
    """The same budget holds for an image that breaks between the reader's check and the tiling."""
    import rsdet_compress.data.prepare as prepare_module
    src, _ = copy_airbus(airbus_dir, tmp_path / "airbus", n=3)
    victim = sorted((src / "train").iterdir())[0]
    real = prepare_module._read_image

    def truncate_then_read(path):
        if path == victim:
            path.write_bytes(path.read_bytes()[:50_000])
        return real(path)

    monkeypatch.setattr(prepare_module, "_read_image", truncate_then_read)
    victim_bytes = victim.read_bytes()
    run_error(capsys, prep("airbus", src, tmp_path / "out", *ALL_TRAIN), str(victim), "1 of 3")
    assert_no_output(tmp_path, "out")
    victim.write_bytes(victim_bytes)
    cfg = tmp_path / "prep.yaml"
    cfg.write_text("max_bad_images: 0.5\n")
    printed = run_ok(capsys, prep("airbus", src, tmp_path / "out2", *ALL_TRAIN, "--config", cfg))
    assert "1 x corrupt image skipped" in printed
    assert victim.stem not in {im["source_image"] for im in coco_json(tmp_path / "out2")["train"]["images"]}


# ---------------------------------------------------------------- 5. silently broken prepare

@pytest.mark.parametrize("split,needle", [("nan,0.5,0.5", "--split"), ("0,0.5,0.5", "train"),
                                          ("1.5,-0.25,-0.25", "--split")])
def test_bad_split_fractions(capsys, kit_dir, tmp_path, split, needle):
    src = kit(tmp_path / "kit", kit_dir, names=("MOS155", "MOS156", "MOS157"))
    run_error(capsys, prep("yolo", src, tmp_path / "out", "--split", split), needle)
    assert_no_output(tmp_path, "out")


def test_empty_val_split_is_an_error_naming_it(capsys, kit_dir, tmp_path):
    src = kit(tmp_path / "kit", kit_dir, names=("MOS155", "MOS156"))
    run_error(capsys, prep("yolo", src, tmp_path / "out"), "'val'", "2 source image")
    assert_no_output(tmp_path, "out")


def test_split_left_without_chips_is_an_error(capsys, kit_dir, tmp_path):
    from rsdet_compress.data.split import split_sources
    names = ("MOS155", "MOS156", "MOS157")
    src = kit(tmp_path / "kit", kit_dir, names=names)
    train = [n for n, s in split_sources(list(names), (0.8, 0.1, 0.1), 0).items() if s == "train"]
    (src / "labels" / f"{train[0]}.txt").write_text("")  # the train scene has no boxes, and none are kept
    run_error(capsys, prep("yolo", src, tmp_path / "out", "--keep-empty", "0"),
              "split 'train'", "1 source image", "--keep-empty 0")
    assert_no_output(tmp_path, "out")


def test_yolo_pixel_coordinates_refused(capsys, kit_dir, tmp_path):
    src = kit(tmp_path / "kit", kit_dir)
    label = src / "labels" / "MOS155.txt"
    rows = [ln.split() for ln in label.read_text().splitlines()]
    label.write_text("".join(f"{r[0]} {float(r[1]) * 1764:.1f} {float(r[2]) * 430:.1f} "
                             f"{float(r[3]) * 1764:.1f} {float(r[4]) * 430:.1f}\n" for r in rows))
    run_error(capsys, prep("yolo", src, tmp_path / "out", *ALL_TRAIN), f"{label}:1", "look like pixels")
    assert_no_output(tmp_path, "out")


def test_every_box_dropped_is_an_error(capsys, airbus_dir, tmp_path):
    src, rows = copy_airbus(airbus_dir, tmp_path / "airbus", n=1)
    for r in rows:  # boxes 3000 px to the right of a 2560 px scene: all out of the image
        r["geometry"] = "[" + ", ".join(f"({int(x) + 3000}, {y})" for x, y in
                                        (p.split(",") for p in r["geometry"][2:-2].split("), ("))) + "]"
    write_airbus_csv(src / "annotations.csv", rows)
    run_error(capsys, prep("airbus", src, tmp_path / "out", *ALL_TRAIN), "no box", "out-of-image")
    assert_no_output(tmp_path, "out")


def test_label_files_without_images_are_counted(capsys, kit_dir, tmp_path):
    src = kit(tmp_path / "kit", kit_dir)
    for n in ("MOS156", "MOS157"):
        shutil.copy(kit_dir / "labels" / f"{n}.txt", src / "labels" / f"{n}.txt")
    printed = run_ok(capsys, prep("yolo", src, tmp_path / "out", *ALL_TRAIN))
    assert "2 x label file without image ignored" in printed
    # DOTA: the devkit fixture's two label files, a real image for one of them
    dota = tmp_path / "dota"
    shutil.copytree(Path(__file__).parent / "fixtures" / "dota", dota)
    (dota / "images").mkdir()
    shutil.copy(kit_dir / "images" / "MOS155.png", dota / "images" / "P0001.png")
    run_ok(capsys, ["data", "prepare", "--format", "dota", "--src", dota, "--out", tmp_path / "dout",
                    "--tile", "256", "--overlap", "0", "--quiet", *ALL_TRAIN])
    summary = json.loads((tmp_path / "dout" / "summary.json").read_text())
    assert summary["warnings"]["label file without image ignored"] == 1


# ---------------------------------------------------------------- 6. unbounded work

def test_huge_overlap_refused_before_any_work(capsys, kit_dir, tmp_path):
    src = kit(tmp_path / "kit", kit_dir)
    line = run_error(capsys, ["data", "prepare", "--format", "yolo", "--src", src, "--out", tmp_path / "out",
                              "--tile", "64", "--overlap", "0.999", "--quiet", *ALL_TRAIN],
                     "--overlap 0.999", "MOS155.png", "limit 10,000")
    assert "tiles" in line
    assert_no_output(tmp_path, "out")


# ---------------------------------------------------------------- 7. two writers, stale partials

def test_second_writer_refused_while_first_holds_the_lock(capsys, kit_dir, tmp_path):
    src = kit(tmp_path / "kit", kit_dir)
    out = tmp_path / "out"
    fd = os.open(tmp_path / ".out.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running prepare holds
        run_error(capsys, prep("yolo", src, out, *ALL_TRAIN), str(out), "another run")
    finally:
        os.close(fd)
    assert_no_output(tmp_path, "out")
    run_ok(capsys, prep("yolo", src, out, *ALL_TRAIN))  # lock released: the next run succeeds


def test_stale_partial_of_a_killed_run_is_removed(capsys, kit_dir, tmp_path):
    src = kit(tmp_path / "kit", kit_dir)
    stale = tmp_path / ".out.xyz.partial"
    (stale / "images" / "train").mkdir(parents=True)
    (stale / "images" / "train" / "half.png").write_bytes(b"left by kill -9")
    other = tmp_path / ".other.abc.partial"  # another output's partial: not ours to remove
    other.mkdir()
    run_ok(capsys, prep("yolo", src, tmp_path / "out", *ALL_TRAIN))
    assert not stale.exists() and other.exists()
    assert (tmp_path / "out" / "data.yaml").is_file()


# ---------------------------------------------------------------- 8. one line, not a traceback

def test_out_is_a_file_even_with_overwrite(capsys, kit_dir, tmp_path):
    src = kit(tmp_path / "kit", kit_dir)
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    run_error(capsys, prep("yolo", src, target, "--overwrite", *ALL_TRAIN), str(target), "not a folder")
    assert target.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_out_in_read_only_folder(capsys, kit_dir, tmp_path):
    src = kit(tmp_path / "kit", kit_dir)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        run_error(capsys, prep("yolo", src, ro / "out", *ALL_TRAIN), str(ro / "out"), "cannot write")
    finally:
        ro.chmod(0o755)
    assert not list(ro.iterdir())


@pytest.mark.parametrize("case", ["list", "image id list", "annotation image_id list", "category id list"])
def test_coco_wrong_types(capsys, kit_dir, tmp_path, case):
    src = tmp_path / "coco"
    (src / "images").mkdir(parents=True)
    shutil.copy(kit_dir / "images" / "MOS155.png", src / "images" / "MOS155.png")
    doc = {"images": [{"id": 1, "file_name": "MOS155.png"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20]}],
           "categories": [{"id": 1, "name": "car"}]}
    if case == "list":
        doc = [doc]
    elif case == "image id list":
        doc["images"][0]["id"] = [1]
    elif case == "annotation image_id list":
        doc["annotations"][0]["image_id"] = [1]
    else:
        doc["categories"][0]["id"] = [1]
    ann = src / "instances.json"
    ann.write_text(json.dumps(doc))
    run_error(capsys, prep("coco", ann, tmp_path / "out", *ALL_TRAIN), str(ann))
    assert_no_output(tmp_path, "out")


def test_non_utf8_text_files(capsys, kit_dir, airbus_dir, tmp_path):
    src, rows = copy_airbus(airbus_dir, tmp_path / "airbus", n=1)
    rows[2]["class"] = "Avión"
    with (src / "annotations.csv").open("w", newline="", encoding="latin-1") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image_id", "geometry", "class"])
        w.writeheader()
        w.writerows(rows)
    run_error(capsys, prep("airbus", src, tmp_path / "a", *ALL_TRAIN), "annotations.csv:4", "not UTF-8")
    ksrc = kit(tmp_path / "kit", kit_dir)
    label = ksrc / "labels" / "MOS155.txt"
    label.write_bytes(label.read_text().encode("utf-16"))
    run_error(capsys, prep("yolo", ksrc, tmp_path / "k", *ALL_TRAIN), f"{label}:1", "not UTF-8")
    dota = tmp_path / "dota"
    shutil.copytree(Path(__file__).parent / "fixtures" / "dota", dota)
    (dota / "images").mkdir()
    shutil.copy(kit_dir / "images" / "MOS155.png", dota / "images" / "P0002.png")
    (dota / "labelTxt" / "P0001.txt").unlink()
    dlabel = dota / "labelTxt" / "P0002.txt"
    dlabel.write_bytes(dlabel.read_bytes() + "20 20 60 20 60 40 20 40 vehículo 0\n".encode("latin-1"))
    run_error(capsys, prep("dota", dota, tmp_path / "d", *ALL_TRAIN), f"{dlabel}:4", "not UTF-8")
    for name in ("a", "k", "d"):
        assert_no_output(tmp_path, name)


def test_config_value_of_wrong_type(capsys, kit_dir, tmp_path):
    src = kit(tmp_path / "kit", kit_dir)
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(f"format: yolo\nsrc: {src}\nout: {tmp_path / 'out'}\ntile: abc\n")
    run_error(capsys, ["data", "prepare", "--config", cfg], str(cfg), "tile", "int")
    assert_no_output(tmp_path, "out")


def test_missing_classes_file(capsys, kit_dir, tmp_path):
    src = kit(tmp_path / "kit", kit_dir)
    missing = tmp_path / "nope.txt"
    run_error(capsys, prep("yolo", src, tmp_path / "out", "--classes", missing, *ALL_TRAIN),
              str(missing), "not found")
    assert_no_output(tmp_path, "out")


# ---------------------------------------------------------------- the decoder's orientation rule

def test_every_exif_orientation_matches_pil_and_size(kit_dir, tmp_path):
    """read_image applies all 8 EXIF orientations as PIL's exif_transpose does; image_size agrees."""
    from PIL import ImageOps
    base = Image.open(kit_dir / "images" / "MOS155.png").convert("RGB").crop((0, 0, 120, 80))
    for o in range(1, 9):
        path = tmp_path / f"o{o}.png"  # PNG: lossless, so pixels compare exactly
        exif = Image.Exif()
        exif[0x0112] = o
        base.save(path, exif=exif)
        expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))[:, :, ::-1]
        got = read_image(path)
        assert np.array_equal(got, expected), o
        assert image_size(path) == (got.shape[1], got.shape[0]) == ((80, 120) if o >= 5 else (120, 80))


def test_coco_size_of_the_unrotated_frame_refused(capsys, kit_dir, tmp_path):
    """Boxes drawn on the stored (un-rotated) frame of an EXIF-rotated photo would land on the wrong
    pixels: the JSON's width/height give it away."""
    src = tmp_path / "coco"
    (src / "images").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = Image.open(kit_dir / "images" / "MOS155.png").convert("RGB")
    photo.transpose(Image.Transpose.ROTATE_90).save(src / "images" / "turned.jpg", quality=90, exif=exif)
    ann = src / "instances.json"
    ann.write_text(json.dumps({"images": [{"id": 3, "file_name": "turned.jpg", "width": 430, "height": 1764}],
                               "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "bbox": [5, 5, 9, 9]}],
                               "categories": [{"id": 1, "name": "car"}]}))
    run_error(capsys, prep("coco", ann, tmp_path / "out", *ALL_TRAIN), str(ann), "image id 3", "430x1764",
              "un-rotated")
    assert_no_output(tmp_path, "out")


def test_yaml_names_with_a_gap_refused(capsys, kit_dir, tmp_path):
    """names {0: car, 2: bus} as a list would make label id 1 'bus' without a word."""
    src = kit(tmp_path / "kit", kit_dir)
    (src / "classes.txt").unlink()
    (src / "data.yaml").write_text("names: {0: car, 2: bus}\n")
    run_error(capsys, prep("yolo", src, tmp_path / "out", *ALL_TRAIN), "data.yaml", "0..1")
    assert_no_output(tmp_path, "out")


@pytest.mark.parametrize("text,needle", [(b"names: [car]\ntrain: images/train\nval: caf\xe9\n", ":3: not UTF-8"),
                                         (b"names: [car]\ntrain: [a, b]\nval: v\n", "'train'"),
                                         (b"names: [car]\ntrain: t\nval: v\ncoco: {val: 3}\n", "'coco'")])
def test_dataset_yaml_errors_are_one_line(tmp_path, text, needle):
    from rsdet_compress.data.config import load_data_config
    from rsdet_compress.errors import UserError
    path = tmp_path / "data.yaml"
    path.write_bytes(text)
    with pytest.raises(UserError, match=needle) as e:
        load_data_config(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
