"""Detector registry and checkpoint format: every registered detector gets every test (timm style).

Covers building and forward shapes, the fp32 / ``weights_only`` checkpoint
round trip, loading a local ultralytics ``.pt``, SkyNet's published structure,
bad input (one-line ``UserError`` naming the file) and the torch/torchvision
pairing guard.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rsdet_compress.detectors.checkpoint import save_detector
from rsdet_compress.detectors.factory import create_detector
from rsdet_compress.detectors.registry import list_detectors
from rsdet_compress.errors import UserError
from rsdet_compress.runtime.checkpoint import load_detector

pytestmark = pytest.mark.usefixtures("one_thread")

NC = 3
NAMES = ["car", "truck", "bus"]
IMGSZ = 256
ALL = list_detectors()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=ALL)
def built(request) -> tuple[str, nn.Module]:
    """(name, model) with BN running statistics moved off their defaults, so buffers matter."""
    torch.manual_seed(0)
    model = create_detector(request.param, NC, names=NAMES)
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, IMGSZ, IMGSZ))  # updates running_mean / running_var
    return request.param, model.eval()


def _eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    assert isinstance(out, tuple), f"eval forward should return a tuple, got {type(out).__name__}"
    return out[0]


def test_registry_lists_the_shipped_detectors():
    assert {"skynet", "yolov8n", "yolov8s", "yolov8m", "yolo11n", "yolo11s", "yolo11m", "yolov8n-p2"} <= set(ALL)
    assert ALL == sorted(ALL)


def test_build_and_forward_shapes(built, x):
    name, model = built
    assert model.detector_name == name
    assert int(model.model[-1].nc) == NC
    assert model.names == dict(enumerate(NAMES))
    strides = [int(s) for s in model.stride]
    assert IMGSZ % max(strides) == 0, f"{name}: max stride {max(strides)} does not divide {IMGSZ}"

    y = _eval_out(model, x)
    anchors = sum((IMGSZ // s) ** 2 for s in strides)
    assert y.shape == (1, 4 + NC, anchors)
    assert torch.isfinite(y).all()
    scores = y[:, 4:]
    assert ((scores >= 0) & (scores <= 1)).all(), "class scores should be sigmoid probabilities"

    model.train()
    try:
        with torch.no_grad():
            preds = model(x)
    finally:
        model.eval()
    assert isinstance(preds, dict)
    assert {"boxes", "scores", "feats"} <= set(preds)
    assert preds["scores"].shape[:2] == (1, NC)
    assert preds["scores"].shape[-1] == anchors
    assert len(preds["feats"]) == len(strides)


def test_save_load_round_trip(built, x, tmp_path):
    name, model = built
    ref = _eval_out(model, x)
    path = save_detector(model, tmp_path / "sub" / f"{name}.pt", meta={"imgsz": IMGSZ, "rescale": 0.5})
    assert path.is_file()
    assert not list(path.parent.glob(".*.tmp")), "temporary checkpoint file left behind"

    loaded, meta = load_detector(path)
    assert not loaded.training
    assert loaded.detector_name == name
    assert meta["detector"] == name and meta["num_classes"] == NC
    assert meta["names"] == NAMES and meta["imgsz"] == IMGSZ and meta["rescale"] == 0.5
    assert loaded.names == dict(enumerate(NAMES))
    out = _eval_out(loaded, x)
    assert torch.equal(out, ref) or torch.allclose(out, ref, rtol=0, atol=0)

    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain dict: no pickled module
    assert isinstance(ckpt, dict)
    assert ckpt["detector"] == name and ckpt["num_classes"] == NC and ckpt["names"] == NAMES
    sd = model.state_dict()
    assert set(ckpt["state_dict"]) == set(sd)
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(v, sd[k].cpu()), k


def test_save_converts_half_to_float32(built, tmp_path):
    name, model = built
    half = create_detector(name, NC, names=NAMES)
    half.load_state_dict(model.state_dict())
    half.half()
    assert next(half.parameters()).dtype == torch.float16
    path = save_detector(half, tmp_path / "half.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    floats = {k: v for k, v in ckpt["state_dict"].items() if v.is_floating_point()}
    assert floats, "no floating-point tensors saved"
    bad = {k: v.dtype for k, v in floats.items() if v.dtype != torch.float32}
    assert not bad, f"non-fp32 tensors in checkpoint: {list(bad.items())[:3]}"
    loaded, _ = load_detector(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    # the fp16 -> fp32 conversion is exact: every value equals the half model's value
    for k, v in half.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(ckpt["state_dict"][k], v.float()), k


def test_weights_argument_loads_own_checkpoint(built, x, tmp_path):
    name, model = built
    path = save_detector(model, tmp_path / "w.pt")
    again = create_detector(name, NC, weights=path, names=NAMES).eval()
    assert torch.equal(_eval_out(again, x), _eval_out(model, x))


# --- a local ultralytics .pt ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ultralytics_pt(tmp_path_factory) -> tuple[Path, nn.Module]:
    from ultralytics.nn.tasks import DetectionModel
    torch.manual_seed(1)
    m = DetectionModel("yolov8n.yaml", nc=NC, verbose=False)
    p = tmp_path_factory.mktemp("ultra") / "yolov8n-custom.pt"
    torch.save({"model": m.half(), "train_args": {"imgsz": 320}}, p)
    return p, m


def test_load_ultralytics_pt(ultralytics_pt):
    p, _ = ultralytics_pt
    model, meta = load_detector(p)
    assert not model.training
    assert all(t.dtype == torch.float32 for t in model.parameters())
    assert int(model.model[-1].nc) == NC
    assert meta["detector"] == "yolov8n"
    assert meta["num_classes"] == NC
    assert meta["imgsz"] == 320
    assert len(meta["names"]) == NC
    with torch.no_grad():
        y = model(torch.zeros(1, 3, 64, 64))[0]
    assert y.shape[:2] == (1, 4 + NC)


def test_create_detector_from_ultralytics_weights(ultralytics_pt):
    p, src = ultralytics_pt
    model = create_detector("yolov8n", NC, weights=p)
    w = model.model[0].conv.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, src.model[0].conv.weight.float())
    assert torch.equal(model.model[-1].cv3[0][0].conv.weight, src.model[-1].cv3[0][0].conv.weight.float())


# --- SkyNet as published -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def skynet() -> nn.Module:
    return create_detector("skynet", NC).eval()


def test_skynet_channel_plan(skynet):
    from rsdet_compress.detectors.skynet import DWPWBundle, Reorg
    bundles = [m for m in skynet.modules() if isinstance(m, DWPWBundle)]
    plan = [(b.dw.in_channels, b.pw.out_channels) for b in bundles]
    assert plan == [(3, 48), (48, 96), (96, 192), (192, 384), (384, 512), (1280, 96)]
    for b in bundles:
        assert b.dw.groups == b.dw.in_channels == b.dw.out_channels, "3x3 conv must be depthwise"
        assert b.dw.kernel_size == (3, 3) and b.pw.kernel_size == (1, 1)

    seen: dict[str, torch.Size] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: seen.__setitem__(k, o.shape))
             for k, m in (("reorg", next(m for m in skynet.modules() if isinstance(m, Reorg))),
                          ("concat", skynet.model[9]), ("last", bundles[-1]))]
    try:
        with torch.no_grad():
            skynet(torch.zeros(1, 3, IMGSZ, IMGSZ))
    finally:
        for h in hooks:
            h.remove()
    assert seen["reorg"] == (1, 768, IMGSZ // 8, IMGSZ // 8)
    assert seen["concat"] == (1, 1280, IMGSZ // 8, IMGSZ // 8)
    assert seen["last"] == (1, 96, IMGSZ // 8, IMGSZ // 8)
    assert [int(s) for s in skynet.stride] == [8]


def test_skynet_backbone_params_match_paper(skynet):
    backbone = sum(p.numel() for p in skynet.model[:-1].parameters())
    # dw 3x3 + BN, pw 1x1 + BN for each bundle: sums to 441,089 (paper: ~0.44M)
    expected = sum(9 * ci + 2 * ci + ci * co + 2 * co
                   for ci, co in [(3, 48), (48, 96), (96, 192), (192, 384), (384, 512), (1280, 96)])
    assert backbone == expected
    assert 0.40e6 <= backbone <= 0.48e6, f"SkyNet backbone has {backbone} params"


# --- bad input -----------------------------------------------------------------------------------

def test_unknown_name():
    with pytest.raises(UserError, match="nosuchnet") as e:
        create_detector("nosuchnet", NC)
    assert "skynet" in str(e.value)  # lists the choices


def test_bad_num_classes():
    with pytest.raises(UserError, match="num_classes"):
        create_detector("skynet", 0)


def test_load_missing_file(tmp_path):
    p = tmp_path / "missing.pt"
    with pytest.raises(UserError) as e:
        load_detector(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 8, b"PK\x03\x04 truncated zip"],
                         ids=["empty", "random", "truncated-zip"])
def test_load_corrupted_checkpoint(tmp_path, content):
    p = tmp_path / "corrupt.pt"
    p.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_detector(p)
    assert str(p) in str(e.value)
    assert "\n" not in str(e.value)


def test_load_plain_dict_that_is_not_ours(tmp_path):
    p = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, p)
    with pytest.raises(UserError) as e:
        load_detector(p)
    assert str(p) in str(e.value)


def test_load_weights_that_do_not_fit(tmp_path):
    torch.manual_seed(0)
    p = save_detector(create_detector("yolov8n", NC), tmp_path / "y.pt")
    ckpt = torch.load(p, weights_only=True)
    ckpt["num_classes"] = 5
    torch.save(ckpt, p)
    with pytest.raises(UserError) as e:
        load_detector(p)
    msg = str(e.value)
    assert str(p) in msg and "yolov8n" in msg and "\n" not in msg


def test_load_unknown_detector_in_checkpoint(tmp_path):
    p = save_detector(create_detector("skynet", NC), tmp_path / "s.pt")
    ckpt = torch.load(p, weights_only=True)
    ckpt["detector"] = "nosuchnet"
    torch.save(ckpt, p)
    with pytest.raises(UserError, match="nosuchnet") as e:
        load_detector(p)
    assert str(p) in str(e.value)


def test_unregistered_ultralytics_yaml_round_trips_through_its_stored_architecture(tmp_path, x):
    """A YOLO detect YAML the registry does not know (P6 head) saves its description and rebuilds from it."""
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load
    torch.manual_seed(0)
    model = DetectionModel({**yaml_model_load("yolov8n-p6.yaml"), "nc": NC}, nc=NC, verbose=False).eval()
    assert "yolov8n-p6" not in ALL
    p = save_detector(model, tmp_path / "p6.pt")
    ckpt = torch.load(p, weights_only=True)
    assert ckpt["detector"] == "yolov8n-p6" and ckpt["arch"]["head"] == model.yaml["head"]
    again, meta = load_detector(p)
    assert meta["detector"] == "yolov8n-p6"
    assert len(again.stride) == 4, "the P6 head's four output scales"
    assert torch.equal(_eval_out(model, x), _eval_out(again, x))


def test_save_requires_a_buildable_description(tmp_path):
    """Neither a registered name nor an ultralytics YAML: nothing could rebuild it, so nothing is written."""
    model = create_detector("skynet", NC)
    model.detector_name = None
    with pytest.raises(ValueError, match="detector_name"):
        save_detector(model, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


# --- environment guard ---------------------------------------------------------------------------

def test_torchvision_nms_works():
    """A torch/torchvision mismatch shows up as 'operator torchvision::nms does not exist'."""
    import torchvision
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep = torchvision.ops.nms(boxes, scores, 0.5)
    assert keep.tolist() == [0, 2]
