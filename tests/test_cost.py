"""The analytic cost model: exact against torch on float and (when apply.py is there) compressed models."""
from __future__ import annotations

import random
import time
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rsdet_compress.compress.cost import Cost, estimate, format_cost, nonconv_flops
from rsdet_compress.compress.policy import ACT_BITS, WEIGHT_BITS, Policy, resolve
from rsdet_compress.compress.view import CompressibleView
from rsdet_compress.detectors.factory import create_detector
from rsdet_compress.detectors.registry import list_detectors

torch.set_num_threads(1)
IMGSZ = 256
DETECTORS = list_detectors()


@pytest.fixture(scope="module")
def views() -> dict[str, CompressibleView]:
    return {}


@pytest.fixture(params=DETECTORS)
def view(request, views) -> CompressibleView:
    name = request.param
    if name not in views:
        views[name] = CompressibleView(create_detector(name, 2), imgsz=IMGSZ)
    return views[name]


def measure(model: nn.Module, imgsz: int) -> tuple[int, int]:
    """(parameter count, FlopCounterMode FLOPs) of one eval forward at imgsz."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncalibrated activation quantizers pass through, with a warning
        model(torch.zeros(1, 3, imgsz, imgsz))
    model.train(was_training)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def float_storage(layer) -> int:
    kh, kw = layer.kernel
    weights = layer.out_channels * (layer.in_channels // layer.groups) * kh * kw
    return 32 * weights + (64 * layer.out_channels if (layer.bn or layer.has_bias) else 0)


# ------------------------------------------------------------------------------------ float model
def test_float_model_matches_torch_exactly(view):
    cost = estimate(view)
    params, flops = measure(view.model, IMGSZ)
    assert cost.params == params
    assert cost.flops == flops  # yolo11n included: attention matmuls are the non-conv term
    assert cost.flops == 2 * cost.macs + cost.nonconv_flops
    assert cost.macs == sum(layer.macs for layer in view.layers.values())
    extra = nonconv_flops(view)
    assert set(extra) <= {b.name for b in view.blocks} | {"global"}
    if view.detector.startswith("yolo11"):
        psa = [b.name for b in view.blocks if any(".attn." in n for n in b.layers)]
        assert list(extra) == psa and extra[psa[0]] > 0  # all attention FLOPs live in the PSABlock
    else:
        assert extra == {} and cost.nonconv_flops == 0


def test_float_storage_convention(view):
    """Float storage is 32 bits per weight + 2 fp32 per output channel of a conv with BN or bias: not 32*params."""
    cost = estimate(view)
    layers = view.layers.values()
    assert cost.weight_bits == sum(float_storage(layer) for layer in layers)
    both = sum(layer.out_channels for layer in layers if layer.bn and layer.has_bias)
    bias_only = sum(layer.out_channels for layer in layers if layer.has_bias and not layer.bn)
    assert cost.weight_bits == 32 * cost.params - 32 * both + 32 * bias_only
    assert cost.bops == 32 * 32 * cost.macs
    assert cost.size_bytes == -(-cost.weight_bits // 8)
    assert all(r == 1 for r in cost.ratios(cost).values())
    assert estimate(view, Policy(detector=view.detector)) == cost  # empty policy == no policy


# ------------------------------------------------------------------------------- hand counts
@pytest.fixture
def skynet(views) -> CompressibleView:
    if "skynet" not in views:
        views["skynet"] = CompressibleView(create_detector("skynet", 2), imgsz=IMGSZ)
    return views["skynet"]


def test_hand_counted_layer_skynet(skynet):
    """4-bit weights on model.2.pw and its group kept at 50%, counted by hand from the LayerInfo numbers."""
    view, name = skynet, "model.2.pw"
    layer = view.layers[name]
    assert layer.kind == "pointwise" and layer.bn and not layer.has_bias and layer.out_group == name
    assert layer.out_channels == view.groups[name].size == 96 and layer.in_channels == 48
    policy = Policy(detector="skynet", groups={name: {"keep": 0.5}}, layers={name: {"weight_bits": 4}})
    cost, ref = estimate(view, policy), estimate(view)
    out_c, in_c = 48, 48
    oh, ow = layer.out_hw
    lay = cost.per_layer[name]
    assert lay["weight_bits"] == out_c * in_c * 1 * 1 * 4 + 32 * out_c + 64 * out_c
    assert lay["params"] == out_c * in_c + 2 * out_c
    assert lay["macs"] == oh * ow * out_c * in_c
    assert lay["bops"] == oh * ow * out_c * in_c * 4 * 32
    # the group also drives the next bundle's depthwise conv (both sides) and the pointwise conv's input
    followers = sorted(n for n, x in view.layers.items() if name in (x.out_group, x.in_group))
    assert followers == ["model.2.pw", "model.4.dw", "model.4.pw"]
    dw, pw = view.layers["model.4.dw"], view.layers["model.4.pw"]
    dw_hw, pw_hw = dw.out_hw[0] * dw.out_hw[1], pw.out_hw[0] * pw.out_hw[1]
    new = {"model.2.pw": lay["weight_bits"],
           "model.4.dw": 32 * out_c * 9 + 64 * out_c,
           "model.4.pw": 32 * pw.out_channels * out_c + 64 * pw.out_channels}
    expected = ref.weight_bits + sum(new[n] - float_storage(view.layers[n]) for n in followers)
    assert cost.weight_bits == expected
    assert cost.per_layer["model.4.dw"]["macs"] == dw_hw * out_c * 9
    assert cost.per_layer["model.4.pw"]["macs"] == pw_hw * pw.out_channels * out_c
    assert cost.params == ref.params - (96 - 48) * (48 + 2) - (96 - 48) * (9 + 2) - (96 - 48) * pw.out_channels
    # per-channel bits: one width per kept channel; float (32) channels carry no scale
    bits = [2, 3, 4, 5, 6, 8, 32, 32] * 6
    cost2 = estimate(view, Policy(detector="skynet", groups={name: {"keep_idx": list(range(0, 96, 2))}},
                                  layers={name: {"weight_bits": bits, "act_bits": 8}}))
    lay2 = cost2.per_layer[name]
    assert lay2["weight_bits"] == in_c * sum(bits) + 32 * 36 + 64 * out_c
    assert lay2["bops"] == oh * ow * in_c * sum(bits) * 8
    assert lay2["mean_weight_bits"] == sum(bits) / 48
    with pytest.raises(ValueError, match="weight bit-widths"):
        estimate(view, Policy(detector="skynet", layers={name: {"weight_bits": bits}}))  # 48 widths, 96 kept


def _tiny_detector() -> nn.Module:
    """Two convs and a one-level Detect head (reg_max 1, legacy branches): every tensor countable by hand."""
    from ultralytics.nn.tasks import DetectionModel
    cfg = {"nc": 1, "reg_max": 1, "legacy": True,
           "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]]],
           "head": [[[1], 1, "Detect", ["nc"]]]}
    model = DetectionModel(cfg, ch=3, nc=1, verbose=False)
    model.detector_name = "tiny"
    return model


def test_hand_counted_tiny_model():
    """Whole-model storage, params and BOPs of a mixed policy, counted by hand tensor by tensor.

    Layers (32 px input): model.0 3->8 k3 s2 (16x16 out), model.1 8->8 k3 s2 (8x8), Detect box branch
    8->16->16 (k3) -> 4 (k1, bias, protected), class branch 8->8->8 (k3) -> 1 (k1, bias, protected).
    """
    from rsdet_compress.compress.apply import apply_policy
    view = CompressibleView(_tiny_detector(), imgsz=32)
    assert sorted(view.protected) == ["model.2.cv2.0.2", "model.2.cv3.0.2"]
    bits1 = [2, 3, 4, 5, 6, 8, 32, 8]
    policy = Policy(detector="tiny", imgsz=32, default_weight_bits=4, default_act_bits=8,
                    groups={"model.0.conv": {"keep_idx": [0, 2, 4, 6]}},
                    layers={"model.1.conv": {"weight_bits": bits1}})
    policy.validate(view)
    # storage: kept weights x bits + one fp32 scale per quantized channel + folded BN/bias (2 x fp32)
    storage = {
        "model.0.conv": 4 * (3 * 9 * 4 + 32) + 4 * 64,                 # 4 of 8 channels kept, 4-bit
        "model.1.conv": 4 * 9 * sum(bits1) + 7 * 32 + 8 * 64,          # 4 inputs left; one float channel
        "model.2.cv2.0.0.conv": 16 * (8 * 9 * 4 + 32) + 16 * 64,
        "model.2.cv2.0.1.conv": 16 * (16 * 9 * 4 + 32) + 16 * 64,
        "model.2.cv2.0.2": 4 * 16 * 32 + 4 * 64,                       # protected: float, bias
        "model.2.cv3.0.0.conv": 8 * (8 * 9 * 4 + 32) + 8 * 64,
        "model.2.cv3.0.1.conv": 8 * (8 * 9 * 4 + 32) + 8 * 64,
        "model.2.cv3.0.2": 1 * 8 * 32 + 1 * 64,
    }
    assert sum(storage.values()) == 29_664  # the sum, written out once
    cost = estimate(view, policy)
    assert {n: cost.per_layer[n]["weight_bits"] for n in storage} == storage
    assert cost.weight_bits == 29_664 and cost.size_bytes == 3_708
    params = (4 * 27 + 4 * 2) + (8 * 36 + 8 * 2) + (16 * 72 + 32) + (16 * 144 + 32) + (4 * 16 + 4) \
        + 2 * (8 * 72 + 16) + (8 + 1)
    assert cost.params == params == sum(p.numel() for p in apply_policy(view, policy).parameters())
    # BOPs = MACs per kept channel x its weight bits x 8-bit activations (protected layers: 32 x 32)
    assert cost.per_layer["model.0.conv"]["bops"] == 16 * 16 * 4 * 27 * 4 * 8
    assert cost.per_layer["model.1.conv"]["bops"] == 8 * 8 * 36 * sum(bits1) * 8
    assert cost.per_layer["model.2.cv2.0.2"]["bops"] == 8 * 8 * 4 * 16 * 32 * 32


def test_concat_consumer_follows_each_group():
    """yolov8n's C2f cv2 reads cat(cv1a, cv1b, m.0): pruning cv1a by half removes 8 of its 48 input channels."""
    view = CompressibleView(create_detector("yolov8n", 2), imgsz=IMGSZ)
    layer = view.layers["model.2.cv2.conv"]
    assert layer.in_channels == 48 and view.groups["model.2.cv1a.conv"].size == 16
    cost = estimate(view, Policy(detector="yolov8n", groups={"model.2.cv1a.conv": {"keep": 0.5}}))
    assert cost.per_layer["model.2.cv2.conv"]["in_channels"] == 40
    # cv1b's group is the bottleneck's residual stream: it feeds cv2 twice (cv1b itself and m.0's output)
    cost = estimate(view, Policy(detector="yolov8n", groups={"model.2.cv1b.conv": {"keep_idx": [0, 1, 2, 3]}}))
    assert cost.per_layer["model.2.cv2.conv"]["in_channels"] == 48 - 2 * 12
    assert cost.per_layer["model.2.m.0.cv2.conv"]["out_channels"] == 4
    # a keep ratio on such a group is exact too (every group channel feeds cv2 the same number of times)
    assert estimate(view, Policy(detector="yolov8n", groups={"model.2.cv1b.conv": {"keep": 0.25}})) == cost


# ------------------------------------------------------------------------------- scaling laws
def test_uniform_bits(view):
    ref = estimate(view)
    prot = [n for n, x in view.layers.items() if x.protected]
    previous = 1.0
    for n in (8, 6, 4, 2):
        for a in (8, 4):
            cost = estimate(view, Policy(detector=view.detector, default_weight_bits=n, default_act_bits=a))
            assert cost.params == ref.params and cost.flops == ref.flops
            ratio = cost.ratios(ref)["size"]
            assert 0.6 * 32 / n < ratio < 32 / n  # scales and folded BN keep it below 32/n
            expected = sum(ref.per_layer[k]["macs"] * (32 * 32 if k in prot else n * a) for k in ref.per_layer)
            assert cost.bops == expected
            storage = 0
            for x in view.layers.values():
                if x.protected:  # protected layers stay float
                    storage += float_storage(x)
                    continue
                kh, kw = x.kernel
                weights = x.out_channels * (x.in_channels // x.groups) * kh * kw
                fold = 64 * x.out_channels if (x.bn or x.has_bias) else 0
                storage += n * weights + 32 * x.out_channels + fold  # n-bit codes + one fp32 scale per channel
            assert cost.weight_bits == storage
        assert ratio > previous
        previous = ratio


def _pick_group(view) -> str:
    """The largest group (<= 512) with two or more follower convs, each a plain one-to-one channel map."""
    for name, group in sorted(view.groups.items(), key=lambda kv: (-kv[1].size, kv[0])):
        followers = [n for n, x in view.layers.items() if name in (x.out_group, x.in_group)]
        if (len(followers) >= 2 and group.size % 2 == 0 and group.size <= 512
                and all(len(pairs) == group.size for _, _, pairs in group.plan)):
            return name
    pytest.skip("no suitable group")


def test_prune_half_a_group(view):
    ref = estimate(view)
    name = _pick_group(view)
    size = view.groups[name].size
    cost = estimate(view, Policy(detector=view.detector, groups={name: {"keep": 0.5}}))
    assert cost == estimate(view, Policy(detector=view.detector,
                                         groups={name: {"keep_idx": list(range(1, size, 2))}}))
    changed = 0
    for k, x in view.layers.items():
        now, was = cost.per_layer[k], ref.per_layer[k]
        if x.out_group == name:  # producers (depthwise: both sides): exactly half the MACs
            assert now["out_channels"] == size // 2
            assert 2 * now["macs"] == was["macs"]
            changed += 1
        elif x.in_group == name or now["in_channels"] != x.in_channels:
            # consumers, directly or through a concat that also reads other groups: the input side
            # shrinks by exactly half the group
            assert now["in_channels"] == x.in_channels - size // 2
            assert now["macs"] * x.in_channels == was["macs"] * now["in_channels"]
            changed += 1
        else:
            assert now == was
    assert changed >= 2 and cost.macs < ref.macs and cost.params < ref.params
    assert cost.flops == 2 * cost.macs + ref.nonconv_flops  # pruning never touches attention


def test_skip_blocks(view):
    if not view.blocks:
        pytest.skip(f"{view.detector} has no skippable blocks")
    ref = estimate(view)
    extra = nonconv_flops(view)
    for block in view.blocks:
        cost = estimate(view, Policy(detector=view.detector, blocks={block.name: "skip"}))
        assert set(ref.per_layer) - set(cost.per_layer) == set(block.layers)
        assert cost.params == ref.params - sum(view.layers[n].params for n in block.layers)
        assert cost.macs == ref.macs - sum(view.layers[n].macs for n in block.layers)
        assert cost.flops == 2 * cost.macs + ref.nonconv_flops - extra.get(block.name, 0)
    if view.detector.startswith("yolo11"):
        psa = next(b for b in view.blocks if b.name in extra)
        assert estimate(view, Policy(detector="yolo11n", blocks={psa.name: "skip"})).nonconv_flops == 0


# ----------------------------------------------------------------------------- API, speed
def test_api_and_format(view):
    ref = estimate(view)
    cost = estimate(view, Policy(detector=view.detector, default_weight_bits=4, default_act_bits=8))
    assert isinstance(cost, Cost)
    d = cost.to_dict()
    for key in ("params", "weight_bits", "macs", "flops", "bops", "per_layer", "size_mb", "gflops", "gbops"):
        assert key in d
    assert set(cost.ratios(ref)) >= {"size", "flops", "bops", "params"}
    assert cost.size_mb == cost.size_bytes / 1e6 and cost.gflops == cost.flops / 1e9
    line = format_cost(cost, ref)
    assert "\n" not in line and "MB" in line and "GFLOPs" in line and "GBOPs" in line and "x smaller" in line
    assert "x smaller" not in format_cost(ref)
    assert estimate(view, per_layer=False).per_layer == {}


def test_fast_enough():
    view = CompressibleView(create_detector("yolov8n", 2), imgsz=IMGSZ)
    rng = random.Random(0)
    policy = Policy(detector="yolov8n", groups={g: {"keep": rng.uniform(0.3, 1)} for g in view.groups},
                    layers={n: {"weight_bits": rng.choice(WEIGHT_BITS), "act_bits": 8} for n in view.quantizable},
                    blocks={view.blocks[0].name: "skip"})
    estimate(view, policy)  # per-view precomputation
    t = time.perf_counter()
    for _ in range(20):
        estimate(view, policy)
    assert (time.perf_counter() - t) / 20 < 5e-3


# --------------------------------------------------------------- against the applied model
def _random_policy(view, rng: random.Random, prune_model, skip: str | None = None) -> Policy:
    det = view.detector
    names = rng.sample(sorted(view.groups), min(6, len(view.groups)))
    policy = Policy(detector=det, groups={n: {"keep": rng.uniform(0.3, 1.0)} for n in names},
                    default_weight_bits=rng.choice(WEIGHT_BITS), default_act_bits=rng.choice(ACT_BITS))
    if view.blocks:
        policy.blocks = {skip or rng.choice(view.blocks).name: "skip"}
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    policy = resolve(policy, view, {n: torch.rand(view.groups[n].size, generator=gen) for n in names})
    # per-channel widths need the kept count of each layer: read it off the pruned model (not off estimate)
    pruned = prune_model(view, policy)
    for n in rng.sample(view.quantizable, 8):
        if any(n.startswith(b + ".") for b in policy.skipped):
            continue
        kept = pruned.get_submodule(n).out_channels
        if rng.random() < 0.5:
            policy.layers[n] = {"weight_bits": [rng.choice(WEIGHT_BITS) for _ in range(kept)],
                                "act_bits": rng.choice(ACT_BITS)}
        else:
            policy.layers[n] = {"weight_bits": rng.choice(WEIGHT_BITS)}
    return policy


def _storage_of(model: nn.Module, view) -> int:
    """Storage bits counted on the applied model's tensors (QConv2d.w_bits), by the documented convention."""
    total = 0
    for name, layer in view.layers.items():
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            continue  # inside a skipped block
        if not isinstance(conv, nn.Conv2d):
            continue
        per_channel = conv.weight[0].numel()
        bits = getattr(conv, "w_bits", None)
        bits = [32] * conv.out_channels if bits is None else [int(b) for b in bits]
        total += per_channel * sum(bits) + 32 * sum(b < 32 for b in bits)
        if layer.bn or layer.has_bias:
            if layer.bn:
                assert model.get_submodule(layer.bn).num_features == conv.out_channels
            total += 64 * conv.out_channels
    return total


def test_matches_applied_model(view):
    apply_mod = pytest.importorskip("rsdet_compress.compress.apply")
    rng = random.Random(f"cost-{view.detector}")
    attention = [b for b in nonconv_flops(view) if b != "global"]  # yolo11n: skip the PSABlock once
    for skip in attention[:1] + [None, None]:
        policy = _random_policy(view, rng, apply_mod.prune_model, skip)
        policy.validate(view)
        cost = estimate(view, policy)
        model = apply_mod.apply_policy(view, policy)
        params, flops = measure(model, IMGSZ)
        assert cost.params == params
        assert cost.flops == flops
        assert cost.weight_bits == _storage_of(model, view)
        if hasattr(view, "kept"):  # the view's own per-dimension count (what Policy.validate uses) agrees
            for name, lay in cost.per_layer.items():
                assert (lay["out_channels"], lay["in_channels"]) == (view.kept(name, "out", policy),
                                                                     view.kept(name, "in", policy)), name
