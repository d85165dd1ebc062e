"""EvalSet + COCO evaluator on a tiny hand-made split whose metrics can be worked out by hand.

Split: 3 flat grey images of 96 x 128 (h x w), classes plane (id 1) and car (id 2):
3 planes, 3 cars, plus one crowd car that COCO must ignore. No box is >= 96^2
pixels, so the "large" bucket has no ground truth.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rsdet_compress.data.evalset import EvalSet
from rsdet_compress.data.letterbox import letterbox
from rsdet_compress.engine.evaluator import (
    Evaluator,
    coco_evaluated,
    coco_metrics,
    resampled_metrics,
    torch_device,
)
from rsdet_compress.errors import UserError

H, W = 96, 128
GREYS = (50, 100, 150)  # image i is flat grey GREYS[i]: the fake model recognises images by it
# (image_id, category_id, [x, y, w, h], iscrowd)
GT = [
    (1, 1, [10, 10, 40, 30], 0),
    (1, 2, [60, 50, 20, 20], 0),
    (2, 1, [20, 30, 50, 40], 0),
    (2, 2, [90, 60, 30, 30], 1),  # crowd / "difficult": neither a hit nor a miss
    (3, 2, [5, 5, 30, 20], 0),
    (3, 2, [70, 40, 40, 40], 0),
    (3, 1, [50, 10, 30, 30], 0),
]
REAL = [g for g in GT if not g[3]]


def write_split(root: Path, categories: list[dict] | None = None) -> Path:
    """Write the images and a COCO JSON under ``root``; return the JSON path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for i, grey in enumerate(GREYS, start=1):
        cv2.imwrite(str(root / "images" / f"tile{i}.png"), np.full((H, W, 3), grey, np.uint8))
        images.append({"id": i, "file_name": f"tile{i}.png", "width": W, "height": H})
    anns = [{"id": k, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": crowd}
            for k, (im, c, b, crowd) in enumerate(GT, start=1)]
    cats = categories or [{"id": 1, "name": "plane"}, {"id": 2, "name": "car"}]
    path = root / "val.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_split(tmp_path_factory.mktemp("split"))


@pytest.fixture(scope="module")
def evalset(split: Path) -> EvalSet:
    return EvalSet.from_coco(split, split.parent / "images", imgsz=64)


def perfect(score: float = 0.9) -> list[list[float]]:
    return [[im, *b, score, c] for im, c, b, _ in REAL]


# ---------------------------------------------------------------- coco_metrics


def test_perfect_predictions_score_one(evalset: EvalSet) -> None:
    m = coco_metrics(evalset.coco, np.array(perfect()))
    assert m["map50"] == 1.0 and m["map50_95"] == 1.0
    assert m["ap_small"] == 1.0 and m["ap_medium"] == 1.0
    assert m["ap_large"] is None  # no ground truth that large
    assert m["per_class"] == {"plane": {"ap50": 1.0, "ap50_95": 1.0}, "car": {"ap50": 1.0, "ap50_95": 1.0}}
    assert m["num_detections"] == len(REAL)


def test_detection_on_crowd_box_is_ignored(evalset: EvalSet) -> None:
    dets = perfect() + [[2, 90, 60, 30, 30, 0.95, 2]]
    assert coco_metrics(evalset.coco, np.array(dets))["map50_95"] == 1.0


def test_no_predictions_score_zero(evalset: EvalSet) -> None:
    for empty in (np.zeros((0, 7)), np.array([]), []):
        m = coco_metrics(evalset.coco, empty)
        assert m["map50"] == 0.0 and m["map50_95"] == 0.0 and m["ap_small"] == 0.0
        assert m["ap_large"] is None
        assert m["per_class"]["plane"] == {"ap50": 0.0, "ap50_95": 0.0}
        assert m["num_detections"] == 0


def test_shifted_box_counts_only_at_low_iou_thresholds(evalset: EvalSet) -> None:
    # Move image 2's plane (w=50) right by 10 px: IoU = 40*40 / (60*40) = 2/3. It is a
    # hit at IoU 0.50..0.65 (4 thresholds) and a false positive + miss at 0.70..0.95 (6).
    # It scores lowest among planes, so there the curve is precision 1 up to recall 2/3:
    # 67 of COCO's 101 recall points (0.00..0.66) -> AP 67/101.
    dets = [d if d[0] != 2 else [2, 30, 30, 50, 40, 0.5, 1] for d in perfect()]
    m = coco_metrics(evalset.coco, np.array(dets))
    plane = (4 * 1.0 + 6 * 67 / 101) / 10
    assert m["map50"] == 1.0
    assert m["per_class"]["plane"]["ap50"] == 1.0
    assert m["per_class"]["plane"]["ap50_95"] == pytest.approx(plane)
    assert m["per_class"]["car"]["ap50_95"] == 1.0
    assert m["map50_95"] == pytest.approx((plane + 1.0) / 2)
    assert 0.0 < m["map50_95"] < 1.0


def test_wrong_class_false_positive(evalset: EvalSet) -> None:
    # A "car" on image 1's plane. Scored below every real car it comes after all hits:
    # precision is 1 at every recall, nothing drops.
    fp = [1, 10, 10, 40, 30, 0.3, 2]
    low = coco_metrics(evalset.coco, np.array(perfect() + [fp]))
    assert low["map50"] == 1.0 and low["map50_95"] == 1.0
    # Scored above them it comes first: precision 1/2, 2/3, 3/4 at recall 1/3, 2/3, 1;
    # interpolated precision is 3/4 at every recall point -> car AP 0.75; plane untouched.
    high = coco_metrics(evalset.coco, np.array(perfect() + [fp[:5] + [0.95, 2]]))
    assert high["per_class"]["car"]["ap50"] == pytest.approx(0.75)
    assert high["per_class"]["plane"] == {"ap50": 1.0, "ap50_95": 1.0}
    assert high["map50"] == pytest.approx(0.875)


def test_resampled_metrics_count_repeated_images_again_without_rematching(evalset: EvalSet) -> None:
    # The same detections as above (a 0.95 "car" on image 1's plane), resampled as a bootstrap does.
    dets = np.array(perfect() + [[1, 10, 10, 40, 30, 0.95, 2]])
    ev = coco_evaluated(evalset.coco, dets)
    assert resampled_metrics(ev, [1, 2, 3], 100) == {k: v for k, v in coco_metrics(evalset.coco, dets).items()
                                                      if k != "num_detections"}
    assert resampled_metrics(ev, [2, 3], 100)["map50"] == 1.0  # image 1 and its false car left out
    # image 1 twice: cars ranked fp, fp, then 4 real ones -> precision 4/6 at every recall; plane AP 1
    twice = resampled_metrics(ev, [1, 1, 2, 3], 100)
    assert twice["per_class"]["car"]["ap50"] == pytest.approx(4 / 6, abs=1e-6)
    assert twice["map50"] == pytest.approx((1 + 4 / 6) / 2, abs=1e-6)
    assert resampled_metrics(ev, [1, 2, 3], 100)["map50"] == pytest.approx(0.875)  # the resamples left no trace


def test_max_dets_keeps_the_best_scores(evalset: EvalSet) -> None:
    # COCO caps detections per image *and class*: image 3 has 2 cars; with max_dets=1
    # only the better-scored survives, so one car is always missed: recall tops out at 2/3.
    dets = perfect()
    dets = [d if d[1:5] != [5, 5, 30, 20] else d[:5] + [0.1, 2] for d in dets]
    m = coco_metrics(evalset.coco, np.array(dets), max_dets=1)
    assert m["per_class"]["car"]["ap50"] == pytest.approx(67 / 101)
    assert m["per_class"]["plane"]["ap50"] == 1.0


def test_per_class_keys_and_class_without_ground_truth(tmp_path: Path) -> None:
    cats = [{"id": 1, "name": "plane"}, {"id": 2, "name": "car"}, {"id": 3, "name": "ship"}]
    es = EvalSet.from_coco(write_split(tmp_path, cats), tmp_path / "images", imgsz=64)
    assert es.class_names == ["plane", "car", "ship"]
    m = coco_metrics(es.coco, np.array(perfect()))
    assert list(m["per_class"]) == es.class_names
    assert m["per_class"]["ship"] == {"ap50": None, "ap50_95": None}
    assert m["map50"] == 1.0  # a class without ground truth does not count


def test_bad_detection_arrays_are_rejected(evalset: EvalSet) -> None:
    with pytest.raises(ValueError, match="N x 7"):
        coco_metrics(evalset.coco, np.zeros((2, 6)))
    with pytest.raises(ValueError, match="image ids"):
        coco_metrics(evalset.coco, np.array([[99, 0, 0, 5, 5, 0.9, 1]]))


# ---------------------------------------------------------------- EvalSet


def test_evalset_letterboxes_to_square(evalset: EvalSet) -> None:
    es = evalset
    assert es.images.shape == (3, 3, 64, 64) and es.images.dtype == torch.uint8
    assert es.image_ids == [1, 2, 3] and es.shapes == [(H, W)] * 3 and es.imgsz == 64
    assert es.class_names == ["plane", "car"] and es.category_ids == [1, 2]
    # 96 x 128 -> gain 0.5 -> 48 x 64, padded 8 rows above and below
    assert es.ratio_pad == [((0.5, 0.5), (0, 8))] * 3
    img = es.images[1]
    assert (img[:, :8] == 114).all() and (img[:, 56:] == 114).all()
    assert (img[:, 8:56] == GREYS[1]).all()


def test_letterbox_matches_ultralytics() -> None:
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    ours, rp = letterbox(img, 256)  # enlarging: both use INTER_LINEAR
    np.testing.assert_array_equal(ours, LetterBox(new_shape=(256, 256), auto=False)(image=img))
    assert rp == ((2.0, 2.0), (0, 32))
    small, rp = letterbox(img, 256, scale_up=False)  # only padded
    assert small.shape == (256, 256, 3) and rp == ((1.0, 1.0), (64, 80))
    np.testing.assert_array_equal(small[80:176, 64:192], img)


def test_max_images_and_unreadable_image(tmp_path: Path) -> None:
    json_path = write_split(tmp_path)
    es = EvalSet.from_coco(json_path, tmp_path / "images", imgsz=32, max_images=2)
    assert es.image_ids == [1, 2] and es.images.shape == (2, 3, 32, 32)
    bad = tmp_path / "images" / "tile3.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="tile3.png: unreadable or corrupt image"):
        EvalSet.from_coco(json_path, tmp_path / "images", imgsz=32)
    bad.unlink()
    with pytest.raises(UserError, match="tile3.png: image file not found"):
        EvalSet.from_coco(json_path, tmp_path / "images", imgsz=32)


# ---------------------------------------------------------------- Evaluator


class OracleModel(torch.nn.Module):
    """Eval forward returns ``(y, {})`` like a DetectionModel: y = (B, 4 + nc, anchors)
    with xywh in input pixels, placing one anchor on each ground-truth box (score 0.99)
    of the image it recognises by its grey level. Other anchors score 0."""

    def __init__(self, es: EvalSet, anchors: int = 6) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # so it has weights and a dtype
        nc = len(es.class_names)
        self.y = torch.zeros(len(es), 4 + nc, anchors)
        for row, image_id in enumerate(es.image_ids):
            (gh, gw), (px, py) = es.ratio_pad[row]
            boxes = [(c, b) for im, c, b, crowd in REAL if im == image_id]
            for a, (c, (x, y, w, h)) in enumerate(boxes):
                self.y[row, :4, a] = torch.tensor([(x + w / 2) * gw + px, (y + h / 2) * gh + py, w * gw, h * gh])
                self.y[row, 4 + es.category_ids.index(c), a] = 0.99

    def forward(self, x: torch.Tensor):  # noqa: ANN201 - mimics ultralytics' output
        rows = [GREYS.index(int(round(float(v)))) for v in x[:, 0, 32, 32] * 255]
        y = self.y[rows] * self.scale
        return y if self.training else (y, {})


def test_evaluator_end_to_end_with_oracle(evalset: EvalSet) -> None:
    model = OracleModel(evalset)  # 6 anchors: also the shape ultralytics' NMS would mistake for end-to-end
    model.eval()
    ev = Evaluator(evalset, batch=2)
    dets, _ = ev.predict(model)
    got = sorted((int(d[0]), int(d[6]), *np.round(d[1:5], 3).tolist()) for d in dets)
    assert got == sorted((im, c, *map(float, b)) for im, c, b, _ in REAL)  # back in original pixels
    m = ev(model)
    assert m["map50"] == 1.0 and m["map50_95"] == pytest.approx(1.0)
    assert m["images"] == 3 and m["num_detections"] == len(REAL)
    assert m["seconds"] > 0 and m["images_per_second"] > 0
    assert not model.training  # eval stays eval


def test_evaluator_on_a_subset_ignores_other_images(split: Path) -> None:
    es = EvalSet.from_coco(split, split.parent / "images", imgsz=64, max_images=1)
    m = Evaluator(es, batch=4)(OracleModel(es, anchors=8))
    # one true positive per class: COCO's precision is 1 / (1 + eps), hence approx
    assert m["map50"] == pytest.approx(1.0) and m["images"] == 1


def test_evaluator_real_ultralytics_model(evalset: EvalSet) -> None:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=2, verbose=False)
    model.train()
    m = Evaluator(evalset, batch=2)(model)
    assert model.training  # train mode restored
    for key in ("map50", "map50_95", "ap_small", "ap_medium"):
        assert isinstance(m[key], float) and 0.0 <= m[key] <= 1.0
    assert m["ap_large"] is None
    assert set(m["per_class"]) == {"plane", "car"}
    assert m["images"] == 3 and m["num_detections"] >= 0


@pytest.mark.parametrize("spec, want", [("cpu", "cpu"), ("0", "cuda:0"), ("1,2", "cuda:1"), (" 0 ", "cuda:0"),
                                        ("cuda:1", "cuda:1"), (torch.device("cpu"), "cpu")])
def test_device_spelled_as_ultralytics_spells_it(spec, want) -> None:
    """``--device 0`` trains on the first GPU; the final evaluation must read it the same way."""
    assert torch_device(spec) == torch.device(want)


def test_evaluator_accepts_a_gpu_index_spec(evalset: EvalSet) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no GPU here; the spec itself is checked above")
    assert Evaluator(evalset, device="0").device == torch.device("cuda:0")
