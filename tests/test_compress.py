"""Compression core over every registered detector: explicit blocks, view, policy, apply, checkpoints."""
from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn
from ultralytics.nn.modules import C2PSA, C2f

from rsdet_compress.compress.apply import apply_policy
from rsdet_compress.compress.baselines import magnitude_pruning, two_stage, uniform_bits
from rsdet_compress.compress.blocks import C2fExplicit, make_prunable
from rsdet_compress.compress.policy import Policy, fingerprint, resolve
from rsdet_compress.compress.quant import QConv2d
from rsdet_compress.compress.view import CompressibleView
from rsdet_compress.detectors.checkpoint import save_detector
from rsdet_compress.detectors.factory import create_detector
from rsdet_compress.detectors.registry import list_detectors
from rsdet_compress.errors import UserError
from rsdet_compress.runtime.checkpoint import load_detector

torch.set_num_threads(1)
IMGSZ = 256
DETECTORS = list_detectors()


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so equalities are not satisfied by zeros and ones."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module", params=DETECTORS)
def view(request) -> CompressibleView:
    model = _randomize_bn(create_detector(request.param, 3))
    return CompressibleView(model, imgsz=IMGSZ)


def _random_policy(view: CompressibleView, seed: int) -> Policy:
    rng = random.Random(seed)
    groups = {g: {"keep": rng.uniform(0.3, 1.0)} for g in rng.sample(sorted(view.groups), k=len(view.groups) // 2)}
    blocks = {b.name: "skip" for b in view.blocks if rng.random() < 0.3}
    layers = {n: {"weight_bits": rng.choice([2, 4, 8, 32]), "act_bits": rng.choice([4, 8, 32])}
              for n in rng.sample(view.quantizable, k=len(view.quantizable) // 3)}
    return Policy(detector=view.detector, imgsz=IMGSZ, groups=groups, blocks=blocks, layers=layers)


@pytest.mark.parametrize("name", ["yolov8n", "yolo11n"])
def test_explicit_blocks_equal_the_originals(name: str):
    model = _randomize_bn(create_detector(name, 3)).eval()
    originals = [m for m in model.modules() if isinstance(m, (C2f, C2PSA))]
    assert originals, "the detector should contain chunk/split blocks"
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        before = model(x)[0]
        count = make_prunable(model)
        after = model(x)[0]
    assert count == len(originals)
    assert not any(isinstance(m, (C2f, C2PSA)) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    block = next(m for m in model.modules() if isinstance(m, C2fExplicit))
    assert block.cv1a.conv.out_channels == block.cv1b.conv.out_channels == block.c
    assert make_prunable(model) == 0  # idempotent


def test_view_structure(view: CompressibleView):
    assert view.groups and view.quantizable
    total = sum(layer.params for layer in view.layers.values())
    assert total == sum(p.numel() for p in view.model.parameters())
    for g in view.groups.values():
        assert g.layers and all(view.layers[n].out_group == g.name for n in g.layers)
    detect = view.model.model[-1]
    for seq in list(detect.cv2) + list(detect.cv3):
        name = view.names[seq[-1]]
        assert name in view.protected and view.layers[name].out_group is None
    if view.detector == "skynet":
        assert view.blocks == []  # SkyNet has no residual blocks
        assert "model.0.dw" in view.protected  # depthwise on the RGB input cannot lose channels
        assert view.layers["model.4.pw"].out_group is None  # reorg source stays whole
    else:
        assert view.blocks and all(b.layers for b in view.blocks)


def test_float_policy_reproduces_outputs(view: CompressibleView):
    policy = Policy(detector=view.detector, imgsz=IMGSZ)
    model = apply_policy(view, resolve(policy, view)).eval()
    assert not any(isinstance(m, QConv2d) for m in model.modules())
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert torch.allclose(model(x)[0], view.model.eval()(x)[0], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_policies_run_forward_and_backward(view: CompressibleView, seed: int):
    policy = _random_policy(view, seed)
    policy.validate(view)
    scores = {g: torch.rand(view.groups[g].size, generator=torch.Generator().manual_seed(seed)) for g in view.groups}
    resolved = resolve(policy, view, scores)
    model = apply_policy(view, resolved)
    for name in view.layers:  # physically smaller tensors, not masks
        if not any(name.startswith(b + ".") for b in policy.skipped):
            conv = model.get_submodule(name)
            assert conv.out_channels == view.kept(name, "out", resolved), name
            assert conv.in_channels == view.kept(name, "in", resolved), name
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in view.model.parameters())
    for b in policy.skipped:
        assert isinstance(model.get_submodule(b), nn.Identity)
        assert not any(n.startswith(b + ".") for n, _ in model.named_modules())
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    model.train()
    out = model(x)
    sum(f.float().mean() for f in out["feats"]).backward()
    model.eval()
    assert model(x)[0].shape[:2] == (2, 4 + 3)
    before = sum(p.numel() for p in view.model.parameters())
    assert before == sum(layer.params for layer in view.layers.values())  # the float model is untouched


def test_compressed_checkpoint_round_trip(view: CompressibleView, tmp_path):
    policy = two_stage(view, 0.5, 4)
    scores = {g: torch.rand(view.groups[g].size) for g in view.groups}
    model = apply_policy(view, resolve(policy, view, scores), share_weights=False)
    model.names = {i: f"c{i}" for i in range(3)}
    path = save_detector(model, tmp_path / "c.pt", {"imgsz": IMGSZ})
    reloaded, meta = load_detector(path)
    assert meta["compressed"] and meta["names"] == ["c0", "c1", "c2"]
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)[0], reloaded(x)[0])
    bits = [m.w_bits for m in reloaded.modules() if isinstance(m, QConv2d)]
    assert bits and all(int(b.max()) == 4 for b in bits)


def test_baselines(view: CompressibleView):
    assert uniform_bits(view, 8).default_weight_bits == 8
    p = magnitude_pruning(view, 0.3)
    assert set(p.groups) == set(view.groups) and all(g["keep"] == pytest.approx(0.7) for g in p.groups.values())
    with pytest.raises(ValueError):
        magnitude_pruning(view, 1.0)


def test_policy_json_round_trip(view: CompressibleView, tmp_path):
    policy = _random_policy(view, 7)
    policy.weights = "0123456789abcdef"
    path = policy.save(tmp_path / "p.json")
    assert Policy.load(path) == policy
    assert json.loads(path.read_text())["schema"] == "rsdet-compress/policy"


def test_policy_validation_errors(view: CompressibleView, tmp_path):
    layer = view.quantizable[0]
    group = next(iter(view.groups))
    bad = {
        "unknown layer": Policy(view.detector, layers={"model.99.conv": {"weight_bits": 4}}),
        "not in": Policy(view.detector, layers={layer: {"weight_bits": 7}}),
        "kept output channels": Policy(view.detector, layers={layer: {"weight_bits": [4, 4]}}),
        "cannot be empty": Policy(view.detector, groups={group: {"keep": 0.0}}),
        "policy is for detector": Policy("skynet" if view.detector != "skynet" else "yolov8n"),
        "unknown channel group": Policy(view.detector, groups={"nope": {"keep": 0.5}}),
        "protected": Policy(view.detector, layers={view.protected[-1]: {"weight_bits": 4}}),
    }
    for needle, policy in bad.items():
        with pytest.raises(UserError, match=needle):
            policy.validate(view)
    with pytest.raises(UserError, match="other weights"):
        Policy(view.detector, weights="aaaa").validate(view, weights="bbbb")
    (tmp_path / "bad.json").write_text('{"schema": "rsdet-compress/policy", "version": 1, "detector": "x", "oops": 1}')
    with pytest.raises(UserError, match="oops"):
        Policy.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match="broken.json:1"):
        Policy.load(tmp_path / "broken.json")


def test_fingerprint_tracks_weights():
    a = create_detector("skynet", 2)
    b = create_detector("skynet", 2)
    b.load_state_dict(a.state_dict())
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        next(b.parameters()).add_(1e-3)
    assert fingerprint(a) != fingerprint(b)


def test_round8_keeps_per_channel_bits_aligned(view):
    """Every group pruned to a count that is not a multiple of 8, every layer with per-channel bits: after
    round8 each kept count is a multiple of 8 (or the full group) and every bit list still matches its conv
    (SkyNet's concat-fed groups are wider than the convs that own a slice of them)."""
    from rsdet_compress.compress.compressor import Workspace
    from rsdet_compress.compress.rounding import round_policy
    ws = Workspace(view, {}, "", {})
    groups = {name: {"keep": 0.61} for name, g in view.groups.items() if g.size >= 16}
    resolved = resolve(Policy(detector=view.detector, groups=groups), view, ws.scores("l1"))
    rng = random.Random(0)
    layers = {name: {"weight_bits": [rng.choice([2, 4, 8]) for _ in range(view.kept(name, "out", resolved))]}
              for name in view.quantizable}
    policy = Policy.from_dict({**resolved.to_dict(), "layers": layers})
    rounded, info = round_policy(ws, policy)
    assert info["channels_added"] > 0
    for name, spec in rounded.groups.items():
        n = len(spec["keep_idx"])
        assert n % 8 == 0 or n == view.groups[name].size, name
    model = apply_policy(view, rounded)  # raises if a bit list does not match its conv
    for name, spec in rounded.layers.items():
        conv = model.get_submodule(name)
        assert len(spec["weight_bits"]) == conv.out_channels, name
        kept_before = layers[name]["weight_bits"]
        assert set(spec["weight_bits"]) <= set(kept_before), name  # added channels take an existing width
    assert model(torch.zeros(1, 3, IMGSZ, IMGSZ)) is not None
