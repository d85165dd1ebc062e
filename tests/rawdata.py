"""Raw data sets for reader and ``data prepare`` tests: small copies of the real KIT and Airbus files,
the hand-written DOTA/VOC/COCO fixtures, and images written on the spot (blank, JPEG, corrupt)."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

from PIL import Image

FIXTURES = Path(__file__).resolve().parent / "fixtures"
#: Four real KIT aerial-cars images (1764 x 430): small enough for CLI tests on a CPU.
KIT_IMAGES = ["MOS155", "MOS156", "MOS157", "MOS158"]
AIRBUS_FIELDS = ["id", "image_id", "geometry", "class"]


def copy_kit(kit_dir: Path, dst: Path, stems=KIT_IMAGES, layout: dict[str, str] | None = None) -> Path:
    """A raw YOLO-layout data set of real KIT images: images/, labels/, classes.txt.

    ``layout`` maps a source stem to 'sub/newname', to build nested or renamed layouts."""
    (dst / "images").mkdir(parents=True)
    (dst / "labels").mkdir()
    shutil.copy(kit_dir / "classes.txt", dst / "classes.txt")
    for s in stems:
        rel = (layout or {}).get(s, s)
        (dst / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / "labels" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(kit_dir / "images" / f"{s}.png", dst / "images" / f"{rel}.png")
        shutil.copy(kit_dir / "labels" / f"{s}.txt", dst / "labels" / f"{rel}.txt")
    return dst


def airbus_csv_rows(airbus_dir: Path) -> list[dict]:
    with (airbus_dir / "annotations.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_airbus_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=AIRBUS_FIELDS)
        w.writeheader()
        w.writerows(rows)


def copy_airbus(airbus_dir: Path, dst: Path, n: int = 2) -> tuple[Path, list[dict]]:
    """The first ``n`` real Airbus scenes (in train/) and a CSV with only their rows."""
    rows = airbus_csv_rows(airbus_dir)
    names = sorted({r["image_id"] for r in rows})[:n]
    (dst / "train").mkdir(parents=True)
    for name in names:
        shutil.copy(next(airbus_dir.rglob(name)), dst / "train" / name)
    rows = [r for r in rows if r["image_id"] in names]
    write_airbus_csv(dst / "annotations.csv", rows)
    return dst, rows


def copy_fixture(name: str, tmp_path: Path) -> Path:
    """One of the hand-written format fixtures (tests/fixtures/<name>), copied so a test may edit it."""
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


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


def make_yolo_set(root: Path, images: dict[str, tuple[tuple[int, int], str]],
                  classes=("car", "truck")) -> Path:
    """images: name -> ((w, h), label text). Writes images/, labels/, classes.txt."""
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for name, (size, label) in images.items():
        write_png(root / "images" / f"{name}.png", size)
        (root / "labels" / f"{name}.txt").write_text(label)
    return root


def label_line_count(path: Path) -> int:
    return len(path.read_text().splitlines())
