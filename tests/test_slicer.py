"""Sliced inference: real-scene recall, merging across windows, bounded memory, GeoJSON, CLI errors."""
from __future__ import annotations

import json
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from rsdet_compress.cli.main import main
from rsdet_compress.engine import predictor
from rsdet_compress.engine.geo import GeoreferenceWarning
from rsdet_compress.engine.slicer import SceneReader, SliceOptions, merge_detections, predict_sliced, tile_windows

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402
from rasterio.errors import NotGeoreferencedWarning  # noqa: E402


class BrightBoxDetector(nn.Module):
    """A deterministic stand-in detector: "detects" the bounding box of the bright pixels of each chip.

    Output follows the ultralytics head (B x (4 + 1) x anchors, xywh in input pixels),
    so the real NMS, coordinate mapping and merging run on it. It is as fast as a
    threshold, for the memory test on a 10k x 10k scene.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], 5, 8)
        bright = x.mean(1) > 0.6
        for i, m in enumerate(bright):
            ys, xs = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
            if len(xs):
                x1, x2, y1, y2 = xs[0].item(), xs[-1].item() + 1, ys[0].item(), ys[-1].item() + 1
                out[i, :, 0] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, 0.9])
        return out


def from_origin(west: float, north: float, xsize: float, ysize: float) -> Affine:
    """North-up transform (rasterio's ``from_origin``, without its ``*`` deprecation warning)."""
    return Affine.translation(west, north) @ Affine.scale(xsize, -ysize)


FAKE_META = {"names": ["thing"], "num_classes": 1, "imgsz": 640, "rescale": 1.0}


@pytest.fixture
def fake_model(monkeypatch):
    """predict() loads the bright-box detector whatever the weights path."""
    monkeypatch.setattr(predictor, "load_model", lambda weights: (BrightBoxDetector(), dict(FAKE_META)))


def _write_tif(path: Path, width: int, height: int, box: tuple[int, int, int, int] | None,
               transform=None, crs=None, background: int = 30) -> Path:
    """A tiled, deflate-compressed 3-band GeoTIFF, written by strips (never whole in memory)."""
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8",
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    if transform is not None:
        profile.update(transform=transform, crs=crs)
    from rasterio.windows import Window
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            for y0 in range(0, height, 1024):
                h = min(1024, height - y0)
                strip = np.full((3, h, width), background, dtype=np.uint8)
                if box is not None:
                    x1, y1, x2, y2 = box
                    strip[:, max(0, y1 - y0):max(0, min(h, y2 - y0)), x1:x2] = 255
                dst.write(strip, window=Window(0, y0, width, h))
    return path


# --- (1) a real airbus scene --------------------------------------------------------------------

def test_sliced_predict_recovers_planes_on_real_scene(trained_yolov8n, small_airbus, airbus_dir, tmp_path):
    """The busiest held-out 2560 px scene (53 planes), sliced at the model's training scale (1/4, 320 px chips).

    Measured: recall@0.5 0.94 at conf 0.1 (0.93 over all 10 held-out scenes, 0.84 at conf 0.25).
    """
    from rsdet_compress.data.readers.airbus import read_airbus
    test = json.loads((Path(small_airbus).parent / "annotations" / "test.json").read_text())
    held_out = sorted({im["source_image"] for im in test["images"]})  # scenes the model never trained on
    records = {r.path.stem: r for r in read_airbus(airbus_dir).images}
    scene = max((records[s] for s in held_out), key=lambda r: len(r.boxes))
    gt = torch.tensor([[b.x1, b.y1, b.x2, b.y2] for b in scene.boxes], dtype=torch.float64)

    t0 = time.perf_counter()
    coco = predictor.predict(trained_yolov8n, scene.path, tmp_path / "pred", conf=0.1, slice_size=320,
                             overlap=0.2, progress=False)
    seconds = time.perf_counter() - t0
    (im,) = coco["images"]
    assert im["sliced"]["window"] == 1280 and im["sliced"]["tiles"] == 9  # 320 px at 1/4 scale, 3 x 3
    det = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                        for a in coco["annotations"]], dtype=torch.float64).reshape(-1, 4)
    recall = float((box_iou(gt, det).max(1).values >= 0.5).float().mean()) if len(det) else 0.0
    print(f"scene {scene.path.stem}: {len(gt)} planes, {len(det)} detections, recall@0.5 {recall:.3f}, "
          f"{seconds:.1f} s")
    assert recall >= 0.8, recall
    cls = torch.tensor([a["category_id"] for a in coco["annotations"]])
    same = (box_iou(det, det) > 0.5) & (cls[:, None] == cls[None]) & ~torch.eye(len(det), dtype=torch.bool)
    assert not same.any()  # no duplicates left by the overlaps
    assert (tmp_path / "pred" / scene.path.name).is_file()


# --- (2) one box for an object across window borders -----------------------------------------------

@pytest.mark.parametrize("merge", ["nms", "wbf"])
@pytest.mark.parametrize("box", [(350, 350, 450, 450),   # inside the overlap: one window sees it whole
                                 (250, 260, 450, 445)])  # wider than the overlap: only pieces everywhere
def test_object_across_tile_borders_gives_one_box(tmp_path, merge, box):
    import cv2
    image = np.full((1000, 1000, 3), 30, dtype=np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    cv2.imwrite(str(tmp_path / "scene.png"), image)
    opts = SliceOptions(slice_size=400, overlap=0.25, batch=3, merge=merge)  # windows at 0, 300, 600
    with SceneReader(tmp_path / "scene.png") as reader:
        dets, tiles = predict_sliced(BrightBoxDetector(), reader, opts, progress=False)
    assert tiles == 9
    assert len(dets) == 1, dets
    np.testing.assert_allclose(dets[0, :4], box)
    assert dets[0, 4] == pytest.approx(0.9)


def test_merge_wbf_averages_complete_duplicates():
    dets = np.array([[100, 100, 200, 200, 0.9, 0], [110, 100, 210, 200, 0.3, 0], [500, 500, 600, 600, 0.8, 0]])
    out = merge_detections(dets, np.array([0, 1, 1]), np.zeros(3, dtype=bool), "wbf", iou=0.5)
    np.testing.assert_allclose(out[:, :5], [[102.5, 100, 202.5, 200, 0.9], [500, 500, 600, 600, 0.8]])
    out = merge_detections(dets, np.array([0, 1, 1]), np.zeros(3, dtype=bool), "nms", iou=0.5)
    np.testing.assert_allclose(out[:, :5], [[100, 100, 200, 200, 0.9], [500, 500, 600, 600, 0.8]])


# --- (3) the grid ------------------------------------------------------------------------------

@pytest.mark.parametrize("width,height,slice_size,overlap,rescale", [
    (2560, 2560, 320, 0.2, 0.25), (1000, 300, 256, 0.3, 1.0), (10000, 7001, 640, 0.2, 0.5),
    (100, 50, 640, 0.2, 1.0), (641, 640, 640, 0.0, 1.0)])
def test_tile_grid_covers_image_exactly_with_overlap(width, height, slice_size, overlap, rescale):
    tiles = tile_windows(width, height, slice_size, overlap, rescale)
    window = round(slice_size / rescale)
    covered = np.zeros((height, width), dtype=bool)
    for t in tiles:
        assert 0 <= t.x0 and t.x0 + t.w <= width and 0 <= t.y0 and t.y0 + t.h <= height  # never padded
        assert (t.w, t.h) == (min(window, width), min(window, height))
        covered[t.y0:t.y0 + t.h, t.x0:t.x0 + t.w] = True
    assert covered.all()
    for axis, length in ((0, width), (1, height)):
        starts = sorted({(t.x0, t.y0)[axis] for t in tiles})
        size = min(window, length)
        assert starts[0] == 0 and starts[-1] + size == length  # the last window is shifted inward
        for a, b in zip(starts, starts[1:]):
            assert size - (b - a) >= int(overlap * window) - 1  # neighbours overlap by at least `overlap`


# --- (4) a 10k x 10k GeoTIFF in bounded memory ------------------------------------------------------

def test_huge_geotiff_runs_tile_by_tile_in_bounded_memory(tmp_path, fake_model):
    src = _write_tif(tmp_path / "huge.tif", 10_000, 10_000, (5000, 7000, 5100, 7060),
                     transform=from_origin(300000, 6000000, 0.5, 0.5), crs="EPSG:32633")
    full_rgb = 10_000 * 10_000 * 3
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        coco = predictor.predict("fake.pt", src, tmp_path / "pred", full_pass=True, progress=False)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"10k x 10k: peak traced {peak / 2**20:.1f} MiB (full RGB {full_rgb / 2**20:.0f} MiB), {seconds:.1f} s")
    assert peak < full_rgb / 4, peak  # well below the 300 MB of the decoded image
    (im,) = coco["images"]
    assert im["sliced"]["slice"] == 640 and im["sliced"]["tiles"] == 20 * 20  # auto: too large to decode
    (ann,) = coco["annotations"]  # the windows' box and the coarse full-pass box merged into one
    np.testing.assert_allclose(ann["bbox"], [5000, 7000, 100, 60], atol=10)
    preview = tmp_path / "pred" / "huge.jpg"
    import cv2
    assert max(cv2.imread(str(preview)).shape[:2]) == predictor.PREVIEW_SIDE
    fc = json.loads((tmp_path / "pred" / "huge.geojson").read_text())
    assert len(fc["features"]) == 1


# --- (5) GeoJSON in the raster's CRS ------------------------------------------------------------

def test_geojson_corners_in_raster_crs(tmp_path, fake_model):
    src = _write_tif(tmp_path / "geo.tif", 800, 600, (100, 200, 150, 260),
                     transform=from_origin(500000, 5000000, 0.5, 0.5), crs="EPSG:32633")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeoreferenceWarning)  # georeferenced: no warning
        predictor.predict("fake.pt", src, tmp_path / "pred", slice_size=256, progress=False)
    fc = json.loads((tmp_path / "pred" / "geo.geojson").read_text())
    assert fc["type"] == "FeatureCollection"
    assert fc["crs"] == {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}
    (feat,) = fc["features"]
    assert feat["geometry"]["type"] == "Polygon"
    ring = feat["geometry"]["coordinates"][0]
    # x = 500000 + 0.5 px, y = 5000000 - 0.5 py; counter-clockwise, closed
    assert ring == [[500050.0, 4999870.0], [500075.0, 4999870.0], [500075.0, 4999900.0],
                    [500050.0, 4999900.0], [500050.0, 4999870.0]]
    assert feat["properties"]["class"] == "thing" and feat["properties"]["score"] == pytest.approx(0.9)
    assert feat["properties"]["bbox_px"] == [100, 200, 150, 260]


# --- (6) a GeoTIFF without georeferencing -------------------------------------------------------

def test_geotiff_without_georeferencing_warns_and_writes_pixels(tmp_path, fake_model, capsys):
    src = _write_tif(tmp_path / "plain.tif", 700, 500, (40, 60, 90, 100))
    with pytest.warns(GeoreferenceWarning, match="plain.tif"):
        predictor.predict("fake.pt", src, tmp_path / "api", slice_size=256, progress=False)
    rc = main(["predict", "--weights", "fake.pt", "--source", str(src), "--out", str(tmp_path / "cli"),
               "--slice", "256"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        f"warning: {src}: no georeferencing; GeoJSON is in pixel coordinates"]
    fc = json.loads((tmp_path / "cli" / "plain.geojson").read_text())
    assert "crs" not in fc and fc["rsdet"]["coordinates"] == "pixel"
    (feat,) = fc["features"]
    assert feat["geometry"]["coordinates"][0] == [[40.0, 60.0], [90.0, 60.0], [90.0, 100.0], [40.0, 100.0],
                                                  [40.0, 60.0]]


def test_reader_stretches_16bit_single_band(tmp_path):
    data = np.full((1, 300, 400), 1000, dtype=np.uint16)
    data[0, 100:150, 200:260] = 4000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp_path / "pan.tif", "w", driver="GTiff", width=400, height=300, count=1,
                           dtype="uint16") as dst:
            dst.write(data)
    with SceneReader(tmp_path / "pan.tif", max_pixels=0) as reader:  # windowed path
        from rsdet_compress.data.tiling import Tile
        win = reader.read(Tile(150, 80, 200, 100))
    assert win.shape == (100, 200, 3) and win.dtype == np.uint8
    assert win[0, 0].tolist() == [0, 0, 0] and win[40, 80].tolist() == [255, 255, 255]


# --- (7) CLI: bad input -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    from rsdet_compress.detectors.checkpoint import save_detector
    from rsdet_compress.detectors.factory import create_detector
    model = create_detector("yolov8n", 1, names=["thing"])
    return save_detector(model, tmp_path_factory.mktemp("ckpt") / "y.pt", meta={"imgsz": 320})


@pytest.mark.parametrize("make_source,flags,needle", [
    (lambda d: d / "notes.txt", ["--slice", "640"], "notes.txt"),
    (lambda d: d / "broken.tif", ["--slice", "640"], "broken.tif"),
    (lambda d: d / "scene.png", ["--slice", "640", "--overlap", "1.5"], "--overlap"),
    (lambda d: d / "scene.png", ["--slice", "640", "--merge", "mean"], "--merge"),
    (lambda d: d / "scene.png", ["--slice", "0"], "--slice"),
])
def test_cli_predict_slice_bad_input(tmp_path, capsys, untrained, make_source, flags, needle):
    import cv2
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage" * 10)
    cv2.imwrite(str(tmp_path / "scene.png"), np.zeros((64, 64, 3), np.uint8))
    out = tmp_path / "pred"
    rc = main(["predict", "--weights", str(untrained), "--source", str(make_source(tmp_path)),
               "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    # nothing partial left; the empty lock file of atomic.staged_dir stays by design (removing it would race)
    assert not out.exists() and not [p for p in tmp_path.glob(".pred.*") if p.suffix != ".lock"]
