"""Latency as a search budget: the measured per-layer table, its prediction, and a search held to it."""
from __future__ import annotations

import json
import os

import pytest

from rsdet_compress import machine
from rsdet_compress.compress.compressor import Workspace
from rsdet_compress.compress.policy import Policy
from rsdet_compress.compress.view import CompressibleView
from rsdet_compress.detectors.factory import create_detector
from rsdet_compress.detectors.registry import list_detectors
from rsdet_compress.errors import UserError
from rsdet_compress.runtime import latency_table
from rsdet_compress.runtime.latency_table import ConvShape, LatencyTable
from rsdet_compress.search import latency_cost as lc
from rsdet_compress.search.budget import Budget
from rsdet_compress.search.latency_cost import LatencyCost, layer_shapes
from rsdet_compress.search.runner import SearchConfig, search


class MacsTable(LatencyTable):
    """A table whose "measurement" is 1 ms per 10 MMACs (+ 0.5x for int8): deterministic and instant."""

    def measure(self, shape: ConvShape) -> float:
        macs = shape.out_c * shape.in_c // shape.groups * shape.kernel ** 2 * (shape.h // shape.stride) * (
            shape.w // shape.stride)
        return macs / 1e7 * (0.5 if shape.int8 else 1.0)


def test_table_file_is_per_instruction_set(monkeypatch):
    """Two machines named alike ("AMD EPYC") but one with AVX-512 VNNI run int8 convs at other speeds: their
    measured tables must not be shared."""
    here = latency_table.table_path("onnxruntime", 2)
    isa = machine.cpu_isa()
    assert isa in machine.cpu_label()
    monkeypatch.setattr(machine, "cpu_isa", lambda: "avx2" if "vnni" in isa else "avx512f+avx512_vnni+avx2")
    assert latency_table.table_path("onnxruntime", 2) != here


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_table_measures_once_and_reads_back(runtime, tmp_path, one_thread):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    path = tmp_path / "t.json"
    table = LatencyTable(runtime, threads=1, runs=3, path=path)
    fp32 = ConvShape(32, 64, 3, 1, 1, 40, 40, False)
    int8 = ConvShape(32, 64, 3, 1, 1, 40, 40, True)
    a, b = table(fp32), table(int8)
    assert a > 0 and b > 0 and table.measured == 2 and table(fp32) == a and table.measured == 2
    again = LatencyTable(runtime, threads=1, path=path)
    assert again(fp32) == a and again(int8) == b and again.measured == 0  # from the file, not re-measured
    assert json.loads(path.read_text())["runtime"] == runtime
    path.write_text("{not json")
    with pytest.raises(UserError, match="t.json: not a latency table"):
        LatencyTable(runtime, threads=1, path=path)
    with pytest.raises(UserError, match="unknown latency runtime 'tvm'"):
        LatencyTable("tvm")


def test_prediction_is_the_float_latency_at_float_and_less_when_pruned(trained_yolov8n, tmp_path):
    ws = Workspace.from_weights(trained_yolov8n)
    view = ws.view
    cost_fn = LatencyCost(view, MacsTable(path=tmp_path / "t.json"), {"fp32": 50.0})
    ref = cost_fn(view)
    assert ref.latency_ms == pytest.approx(50.0)  # the rest term makes the float prediction the measured value
    assert all("latency_ms" in ref.per_layer[n] for n in layer_shapes(view, ref))
    half = Policy(detector=view.detector, imgsz=view.imgsz, groups={g: {"keep": 0.5} for g in view.groups})
    quant = Policy(detector=view.detector, imgsz=view.imgsz,
                   layers={n: {"weight_bits": 4, "act_bits": 8} for n in view.quantizable})
    pruned, q = cost_fn(view, ws.resolve(half)), cost_fn(view, quant)
    assert pruned.latency_ms < ref.latency_ms and q.latency_ms < ref.latency_ms
    assert any(s.int8 for s in layer_shapes(view, q).values())
    assert cost_fn(view, quant).ratios(ref)["latency"] == pytest.approx(ref.latency_ms / q.latency_ms)
    assert cost_fn.scale < 1 and cost_fn.rest_ms == 0  # isolated convs add up to more than the whole: scaled
    slow = LatencyCost(view, cost_fn.table, {"fp32": 1e5})  # convs are a part of it: the rest is a constant
    assert slow.scale == 1 and slow.rest_ms > 0 and slow(view).latency_ms == pytest.approx(1e5)
    assert 0 < slow(view, ws.resolve(half)).latency_ms < 1e5


def test_prediction_reproduces_its_anchors_and_int8_pays_its_own_rest(trained_yolov8n, tmp_path):
    """Fitted to four whole-model timings (float and half width, fp32 and int8), the prediction gives each back,
    and an int8 graph's non-conv rest (Q/DQ, quantized SiLU) is its own, not the float graph's."""
    ws = Workspace.from_weights(trained_yolov8n)
    view, table = ws.view, MacsTable(path=tmp_path / "t.json")
    half = lc.anchor_policies(ws)["_half"]
    assert half.groups and all(len(g["keep_idx"]) % 8 == 0 or len(g["keep_idx"]) == view.groups[n].size
                               for n, g in half.groups.items())  # kept x8 (or the whole group)
    probe = LatencyCost(view, table, {"fp32": 1.0})
    conv = {(p8, h): sum(probe._terms(lc.as_int8(view, pol) if p8 else pol)[0].values())
            for p8 in (False, True) for h, pol in (("", None), ("_half", half))}
    anchors = {"fp32": conv[False, ""] + 30, "fp32_half": conv[False, "_half"] + 20,
               "int8": conv[True, ""] + 60, "int8_half": conv[True, "_half"] + 35}
    cost = LatencyCost(view, table, anchors, half)
    for name, pol in (("fp32", None), ("fp32_half", half), ("int8", lc.as_int8(view, None)),
                      ("int8_half", lc.as_int8(view, half))):
        assert cost(view, pol).latency_ms == pytest.approx(anchors[name], rel=1e-6), name
    f32, f8 = cost.fits[False], cost.fits[True]
    assert f32.scale == f8.scale == 1 and f32.per_act_ms > 0 and f32.const_ms > 0
    assert f8.per_act_ms > f32.per_act_ms and f8.const_ms > 0
    assert cost.rest_ms == pytest.approx(30)
    # the float-only fit of before: one constant rest, so the int8 model comes out 60 - 30 ms too fast
    old = LatencyCost(view, table, {"fp32": anchors["fp32"]})
    assert old(view, lc.as_int8(view, None)).latency_ms == pytest.approx(anchors["int8"] - 30, rel=1e-6)
    # noisy anchors (the half model slower than the float one) never give a negative term
    noisy = LatencyCost(view, table, {**anchors, "fp32_half": anchors["fp32"] * 2}, half)
    assert min(vars(noisy.fits[False]).values()) >= 0 and noisy(view, half).latency_ms > 0


@pytest.mark.parametrize("detector", list_detectors())
def test_a_branch_costs_the_same_until_the_policy_drops_it_whole(detector, tmp_path):
    """SkyNet's reorg bypass: OpenVINO transposes the whole space-to-depth map whatever channels the concat keeps,
    so only dropping it whole saves its time. The model without it, timed, sets that time; every anchor is
    still predicted as measured."""
    view = CompressibleView(create_detector(detector, 2), imgsz=64)
    branches, nobranch = lc.droppable_branches(view), lc.without_branches(view)
    if detector != "skynet":
        assert branches == {} and nobranch is None
        return
    assert branches == {"model.8": ("model.7.pw", frozenset(range(768)))}  # reorg: the concat's first 768
    assert nobranch.groups == {"model.7.pw": {"keep_idx": list(range(768, 1280))}}
    table = MacsTable(path=tmp_path / "t.json")
    half = Policy(detector=view.detector, imgsz=view.imgsz,
                  groups={g: {"keep_idx": list(range(0, view.groups[g].size, 2))} for g in view.groups})
    probe = LatencyCost(view, table, {"fp32": 40.0, "fp32_half": 25.0}, half)
    anchors = {"fp32": 40.0, "fp32_half": 25.0, "fp32_nobranch": probe(view, nobranch).latency_ms - 6.0}
    cost = LatencyCost(view, table, anchors, half, nobranch)
    assert cost.branch_ms[False] == pytest.approx(6.0, rel=0.05)
    for name, pol in (("fp32", None), ("fp32_half", half), ("fp32_nobranch", nobranch)):
        assert cost(view, pol).latency_ms == pytest.approx(anchors[name], rel=1e-3), name
    keep = list(range(768, 1280))
    one = Policy(detector=view.detector, imgsz=view.imgsz, groups={"model.7.pw": {"keep_idx": [0, *keep]}})
    # one reorg channel kept: a few activations more than without the branch, and the branch's whole time
    assert cost(view, one).latency_ms - cost(view, nobranch).latency_ms > 6.0
    assert cost(view, one).per_layer["model.7.pw"]["latency_ms"] > cost(view, nobranch).per_layer[
        "model.7.pw"]["latency_ms"] + 6.0
    assert probe(view, one).latency_ms - probe(view, nobranch).latency_ms < 1.0  # by activations alone: free


def test_fit_takes_the_first_split_of_the_rest_that_leaves_no_term_negative():
    """Rows are (table ms of the convs, activation share, constant weight, measured ms) at full and half width."""
    fit = lc.fit_precision([(100, 1.0, 1.0, 130), (50, 0.5, 1.0, 70)])  # scale 1: 20 per activation + 10
    assert (fit.scale, fit.per_act_ms, fit.const_ms) == pytest.approx((1, 20, 10))
    fit = lc.fit_precision([(100, 1.0, 1.0, 130), (40, 0.5, 1.0, 54)])  # shrinks faster: no constant part
    assert (fit.scale, fit.per_act_ms, fit.const_ms) == pytest.approx((1.1, 20, 0))
    fit = lc.fit_precision([(100, 1.0, 1.0, 130), (40, 0.5, 1.0, 200)])  # half slower than full: noise
    assert (fit.scale, fit.per_act_ms, fit.const_ms) == pytest.approx((1, 0, 30))
    assert vars(lc.fit_precision([(100, 1.0, 1.0, 50)])) == pytest.approx({"scale": 0.5, "per_act_ms": 0,
                                                                          "const_ms": 0})


def test_search_under_a_latency_budget_meets_it_by_the_table(trained_yolov8n, small_airbus, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(lc, "measure_model_ms", lambda *a, **k: 40.0)
    from rsdet_compress.search import runner
    monkeypatch.setattr(runner, "LatencyTable", lambda runtime, threads: MacsTable(runtime, threads,
                                                                                   path=tmp_path / "t.json"))
    cfg = SearchConfig(weights=str(trained_yolov8n), data=str(small_airbus), agent="ajpq", episodes=2, seed=0,
                       calib_images=4, reward_images=8, budget=["latency=0.6"])
    r = search(cfg, progress=False)
    assert r.candidates and all(c["metrics"]["usage.latency"] <= 0.6 + 1e-9 for c in r.candidates)
    assert all(c["metrics"]["latency_ms"] <= 0.6 * 40.0 + 1e-6 for c in r.candidates)
    assert r.best["metrics"]["latency_ratio"] >= 1 / 0.6 - 1e-6
    assert Budget.parse(["latency=1/3"]).as_dict() == {"latency": pytest.approx(1 / 3)}


def test_bad_latency_settings_fail_fast(trained_yolov8n, small_airbus):
    base = dict(weights=str(trained_yolov8n), data=str(small_airbus), budget=["latency=0.5"])
    with pytest.raises(UserError, match="unknown --latency-runtime 'tvm'"):
        search(SearchConfig(**base, latency_runtime="tvm"), progress=False)
    with pytest.raises(UserError, match="--latency-threads must be >= 1"):
        search(SearchConfig(**base, latency_threads=0), progress=False)
    assert os.environ.get("RSDET_RUNS")  # the tables of the searches above went to the test's own runs folder
