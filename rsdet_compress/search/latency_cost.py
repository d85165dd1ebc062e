"""Latency as a search budget: a policy's analytic cost plus its latency predicted from measured layers.

``LatencyCost(view, table, anchors)`` is a drop-in for :func:`~rsdet_compress.compress.cost.estimate`:
it returns the same :class:`Cost` with ``latency_ms`` set and ``per_layer[name]["latency_ms"]``
filled. A policy's latency is the sum, over its kept convs, of

* the conv itself: its entry in the :class:`~rsdet_compress.runtime.latency_table.LatencyTable`
  (kept shape, int8 where the policy quantizes it) less what any one-conv graph costs per call
  (the entry of the smallest conv, :data:`OVERHEAD_SHAPE`), times ``scale`` of its precision;
* the elementwise work riding on its output (SiLU, concat, upsample, and in int8 the
  Q/DQ and quantized activations): ``per_act_ms`` of its precision times the conv's
  share of the float model's activation volume (channels x output pixels);

plus the work that does not shrink with the channels (box decoding, the runtime's per-call
work): ``const_ms``, mixed between fp32 and int8 by the share of activations in int8;
plus, for each parameter-free branch the policy keeps (:func:`droppable_branches`: SkyNet's reorg
bypass), ``branch_ms`` of its group's precision. Such a branch costs about the same whether it keeps
a few channels or all (OpenVINO transposes the whole space-to-depth map, then gathers), so only a
policy that drops it whole saves that time; charged by activation volume it would look free.

The three numbers per precision come from whole models timed on the runtime, the anchors
(:func:`measure_anchors`): the float model and its half-width twin (every group at
:data:`ANCHOR_KEEP`, kept x8), each exported fp32 and int8, fitted by :func:`fit_precision`
(two anchors, three numbers: one is held, see there); a detector with droppable branches adds the
float model without them (``_nobranch``), whose measured latency sets ``branch_ms``. So the
prediction of every anchor is its measured latency where the timings are consistent, int8
graphs pay their own non-conv costs (a constant float rest under-predicted the int8 YOLOv8n
by 20-55% on onnxruntime), and pruning shrinks the elementwise work with the channels.
With only the fp32 float model timed (``anchors={"fp32": ms}``) the rest is one constant for
every policy. A ``latency=0.33`` budget is then a third of the float model's measured latency,
and the search ranks policies by what they cost on this machine's runtime instead of by FLOPs.

:func:`measure_model_ms` times a whole detector exported for the runtime (the anchors; a
compressed one to check the prediction).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rsdet_compress.compress.baselines import magnitude_pruning
from rsdet_compress.compress.cost import Cost, estimate
from rsdet_compress.compress.policy import Policy
from rsdet_compress.compress.pruners import CUSTOM_PRUNERS
from rsdet_compress.compress.quant import FLOAT_BITS
from rsdet_compress.compress.rounding import round_policy
from rsdet_compress.engine.latency import summarize, time_fn
from rsdet_compress.export.onnx import export_module, quantize_int8
from rsdet_compress.export.openvino import export_openvino
from rsdet_compress.runtime.latency_table import ConvShape, LatencyTable
from rsdet_compress.runtime.loader import OnnxDetector
from rsdet_compress.runtime.openvino import OpenVinoDetector


def layer_shapes(view, cost: Cost) -> dict[str, ConvShape]:
    """Each conv of ``cost.per_layer`` as deployed: kept channels, and int8 where weights <= 8 and acts 8 bits."""
    shapes = {}
    for name, p in cost.per_layer.items():
        info = view.layers[name]
        if not p["out_channels"]:
            continue
        int8 = p["mean_weight_bits"] < FLOAT_BITS and p["act_bits"] <= 8
        shapes[name] = ConvShape(p["in_channels"], p["out_channels"], info.kernel[0], info.stride, p["groups"],
                                 info.in_hw[0], info.in_hw[1], int8)
    return shapes


#: width of the second anchor model: far enough from the float model to separate the rest's constant
#: part from its activation-proportional part, and inside the range a latency budget drives a search to
ANCHOR_KEEP = 0.5
#: anchor names: precision, and ``_half`` for the half-width model, ``_nobranch`` for the float model
#: without its droppable branches (only measured where the detector has some)
ANCHORS = ("fp32", "int8", "fp32_half", "int8_half", "fp32_nobranch", "int8_nobranch")


def droppable_branches(view) -> dict[str, tuple[str, frozenset[int]]]:
    """Parameter-free modules whose output channels a policy prunes (SkyNet's reorg, through its concat).

    ``{module: (channel group, the group's channels it carries)}``: keeping none of those channels
    removes the module from the deployed graph.
    """
    out = {}
    for group in view.groups.values():
        for mod, handler, pairs in group.plan:
            if mod in view.layers or not view.graph.is_out_channel_pruning_fn(handler):
                continue
            if type(view.model.get_submodule(mod)) in CUSTOM_PRUNERS:
                out[mod] = (group.name, frozenset(r for _, r in pairs))
    return out


def without_branches(view) -> Policy | None:
    """The float structure with every :func:`droppable_branches` removed (None: the detector has none)."""
    groups: dict[str, set[int]] = {}
    for group, channels in droppable_branches(view).values():
        groups.setdefault(group, set(range(view.groups[group].size))).difference_update(channels)
    if not groups:
        return None
    return Policy(detector=view.detector, imgsz=view.imgsz,
                  groups={g: {"keep_idx": sorted(keep)} for g, keep in groups.items()})


def activation_volume(view, cost: Cost) -> dict[str, float]:
    """Output elements (kept channels x output pixels) of each conv of ``cost.per_layer`` that keeps channels."""
    return {name: float(p["out_channels"] * view.layers[name].out_hw[0] * view.layers[name].out_hw[1])
            for name, p in cost.per_layer.items() if p["out_channels"]}


def measure_model_ms(model: nn.Module, meta: dict, imgsz: int, runtime: str, threads: int, runs: int = 20,
                     calib_batches: list | None = None) -> float:
    """Median batch-1 ms of ``model`` exported for ``runtime``; int8 when ``calib_batches`` are given.

    int8 is what ``export`` ships for the runtime by default: onnxruntime's QDQ graph, NNCF's for OpenVINO.
    """
    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        if runtime == "openvino":
            path = export_openvino(model, meta, Path(tmp) / "m.xml", imgsz, calib_batches)
            det = OpenVinoDetector(path, threads=threads)
        else:
            path = export_module(model, meta, Path(tmp) / "m.onnx", imgsz)
            if calib_batches is not None:
                path = quantize_int8(path, Path(tmp) / "q.onnx", calib_batches)
            det = OnnxDetector(path, threads=threads)
        return summarize(time_fn(lambda: det(x), runs, warmup=3), 1)["median_ms"]


def anchor_policies(ws) -> dict[str, Policy | None]:
    """``{"": None (the float model), "_half": every group at ANCHOR_KEEP, kept channels rounded up to x8}``,
    and ``"_nobranch"``: the float model without its droppable branches, where it has some."""
    half = round_policy(ws, ws.resolve(magnitude_pruning(ws.view, 1.0 - ANCHOR_KEEP)))[0]
    nobranch = without_branches(ws.view)
    return {"": None, "_half": half, **({"_nobranch": nobranch} if nobranch is not None else {})}


def as_int8(view, policy: Policy | None) -> Policy:
    """``policy``'s structure with every quantizable conv at w8a8: how an anchor timed in int8 is looked up."""
    out = Policy.from_dict(policy.to_dict()) if policy is not None else Policy(detector=view.detector,
                                                                               imgsz=view.imgsz)
    out.default_weight_bits = out.default_act_bits = 8
    return out


def measure_anchors(ws, table: LatencyTable, policies: dict[str, Policy | None], runs: int = 20) -> dict[str, float]:
    """The :data:`ANCHORS` of ``ws``'s float weights (:func:`anchor_policies`) timed on ``table``'s runtime.

    Each is kept in the table's file under the weights' fingerprint, so it is measured once per machine.
    Latency does not depend on weight values, so the half-width anchor is the float model with
    channels removed (no calibration) and int8 is calibrated on random images.
    """
    imgsz = int(ws.view.imgsz)
    calib = [torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    out = {}
    for suffix, policy in policies.items():
        model = None
        for precision in ("fp32", "int8"):
            def timed(policy=policy, precision=precision) -> float:
                nonlocal model
                if model is None:
                    model = ws.view.model if policy is None else ws.apply(policy, bn=False)
                return measure_model_ms(model, ws.meta, imgsz, table.runtime, table.threads, runs,
                                        calib if precision == "int8" else None)
            shape = {"": "keep 1.0", "_half": f"keep {ANCHOR_KEEP}"}.get(suffix, suffix.lstrip("_"))
            key = f"{ws.weights_fp}|{imgsz}|{precision}|{shape}"
            out[precision + suffix] = table.model_ms(key, timed)
    return out


#: the smallest conv the table can time (8 -> 8 channels, 1x1, 8x8 pixels): what an isolated one-conv graph
#: costs per call whatever its size, taken off every entry so that pruning is not charged for it
OVERHEAD_SHAPE = (8, 8, 1, 1, 1, 8, 8)


@dataclass
class PrecisionFit:
    """How one precision's whole-model latency is put together from its table entries (see the module doc)."""

    scale: float = 1.0  # multiplies this precision's table entries: isolated convs misstate the fused graph
    per_act_ms: float = 0.0  # the non-conv rest that scales with activations, per float model's volume
    const_ms: float = 0.0  # the non-conv rest that does not


def _solve2(m: list[list[float]], r: list[float]) -> tuple[float, float] | None:
    det = m[0][0] * m[1][1] - m[0][1] * m[1][0]
    if abs(det) < 1e-12:
        return None
    return (r[0] * m[1][1] - r[1] * m[0][1]) / det, (m[0][0] * r[1] - m[1][0] * r[0]) / det


def fit_precision(rows: list[tuple[float, float, float, float]]) -> PrecisionFit:
    """``scale * convs + per_act * share + const * weight = ms`` through the anchor rows, every term >= 0.

    Full width alone: ``scale`` so the convs fit inside the whole, the rest constant. With the
    half-width row too, two of the three are solved exactly with the third held: the scale
    from full width (the rest splits into a shrinking and a constant part); else no constant
    (the rest shrinks faster than the activations: in-graph convs cost another multiple of
    their isolated time); else no per-activation part. The first that leaves no term negative
    wins; noisy anchors that none fits fall back to full width alone.
    """
    (c1, a1, b1, m1) = rows[0]
    s0 = min(1.0, m1 / c1) if c1 > 0 and m1 > 0 else 1.0
    if len(rows) > 1:
        c2, a2, b2, m2 = rows[1]
        held_scale = _solve2([[a1, b1], [a2, b2]], [m1 - s0 * c1, m2 - s0 * c2])
        no_const = _solve2([[c1, a1], [c2, a2]], [m1, m2])
        no_per = _solve2([[c1, b1], [c2, b2]], [m1, m2])
        for fit in ((s0, *held_scale) if held_scale else None, (*no_const, 0.0) if no_const else None,
                    (no_per[0], 0.0, no_per[1]) if no_per else None):
            if fit and fit[0] > 0 and fit[1] >= 0 and fit[2] >= 0:
                return PrecisionFit(*fit)
    rest = max(m1 - s0 * c1, 0.0)
    return PrecisionFit(s0, 0.0, rest / b1) if b1 > 0 else PrecisionFit(s0, rest / a1 if a1 > 0 else 0.0, 0.0)


class LatencyCost:
    """``estimate``-compatible: the analytic cost plus predicted latency (see the module docstring)."""

    def __init__(self, view, table: LatencyTable, anchors: dict[str, float], half: Policy | None = None,
                 nobranch: Policy | None = None) -> None:
        """``anchors``: measured ms by :data:`ANCHORS` name (``fp32`` at least); ``half``: the half-width policy;
        ``nobranch``: the float structure without its droppable branches (:func:`without_branches`)."""
        if "fp32" not in anchors:
            raise ValueError("a latency prediction needs at least the float model's fp32 latency")
        self.view, self.table, self.anchors = view, table, dict(anchors)
        self.overhead = {p8: table(ConvShape(*OVERHEAD_SHAPE, p8)) for p8 in (False, True)}
        self.volume = sum(activation_volume(view, estimate(view)).values())
        self.branches = droppable_branches(view)
        self.branch_ms = {False: 0.0, True: 0.0}
        structures = {"": None, **({"_half": half} if half is not None else {})}
        self._fit_all(structures)
        if nobranch is not None and self.branches:
            # what the prediction without a branch term over-states for the model without the branches is the
            # branches' cost; taken off the anchors that keep them, the refit leaves the rest to the other terms
            for _ in range(3):  # linear terms settle at once; a re-held scale moves them a little
                for int8, precision in ((False, "fp32"), (True, "int8")):
                    if precision + "_nobranch" in anchors:
                        pol = as_int8(view, nobranch) if int8 else nobranch
                        err = self(view, pol).latency_ms - anchors[precision + "_nobranch"]
                        self.branch_ms[int8] = max(0.0, self.branch_ms[int8] + err)
                self._fit_all(structures)

    def _fit_all(self, structures: dict[str, Policy | None]) -> None:
        self.fits = {False: self._fit(structures, "fp32")}
        self.fits[True] = self._fit(structures, "int8") if "int8" in self.anchors else self.fits[False]

    def conv_ms(self, shape: ConvShape) -> float:
        """The table's entry for ``shape`` less the per-call cost of an isolated graph."""
        return max(self.table(shape) - self.overhead[shape.int8], 0.0)

    def _terms(self, policy: Policy | None) -> tuple[dict[bool, float], dict[bool, float], dict[str, ConvShape]]:
        """Table ms and share of the float model's activation volume of ``policy``'s convs, by int8-or-not;
        and the convs' shapes."""
        cost = estimate(self.view, policy)
        volume = activation_volume(self.view, cost)
        ms, share = {False: 0.0, True: 0.0}, {False: 0.0, True: 0.0}
        shapes = layer_shapes(self.view, cost)
        for name, shape in shapes.items():
            ms[shape.int8] += self.conv_ms(shape)
            share[shape.int8] += volume[name] / self.volume
        return ms, share, shapes

    def _kept_branches(self, policy: Policy | None, shapes: dict[str, ConvShape]) -> dict[str, tuple[str, bool]]:
        """The droppable branches ``policy`` keeps: ``{module: (its group's first conv, int8 or not)}``."""
        out = {}
        for mod, (group, channels) in self.branches.items():
            spec = policy.groups.get(group) if policy is not None else None
            if spec and ("keep_idx" in spec and channels.isdisjoint(spec["keep_idx"]) or spec.get("keep", 1) == 0):
                continue
            layer = self.view.groups[group].layers[0]
            out[mod] = (layer, layer in shapes and shapes[layer].int8)
        return out

    def _fit(self, structures: dict[str, Policy | None], precision: str) -> PrecisionFit:
        """One row per anchor of ``precision`` for :func:`fit_precision`.

        An int8 anchor keeps the convs our policies never quantize (the head's last ones) in fp32:
        their part is predicted with the fp32 fit first, and the int8 fit explains what is left.
        """
        int8, rows = precision == "int8", []
        for suffix, policy in structures.items():
            if precision + suffix not in self.anchors:
                continue
            policy = as_int8(self.view, policy) if int8 else policy
            ms, share, shapes = self._terms(policy)
            q = share[int8] / max(share[False] + share[True], 1e-12)
            rest = self.anchors[precision + suffix] - sum(
                self.branch_ms[p8] for _, p8 in self._kept_branches(policy, shapes).values())
            if int8:  # the fp32 convs of an int8 anchor, at the fp32 fit
                f32 = self.fits[False]
                rest -= f32.scale * ms[False] + f32.per_act_ms * share[False] + (1 - q) * f32.const_ms
            rows.append((ms[int8], share[int8], q, rest))
        return fit_precision(rows)

    @classmethod
    def measured(cls, ws, table: LatencyTable, runs: int = 20) -> LatencyCost:
        """Fitted to the anchors of ``ws``'s float weights, timed on ``table``'s runtime (or read from its file)."""
        policies = anchor_policies(ws)
        return cls(ws.view, table, measure_anchors(ws, table, policies, runs), policies["_half"],
                   policies.get("_nobranch"))

    @property
    def scale(self) -> float:
        return self.fits[False].scale

    @property
    def rest_ms(self) -> float:
        """The float model's fp32 latency that is not its convs."""
        return self.fits[False].per_act_ms + self.fits[False].const_ms

    def __call__(self, view, policy: Policy | None = None, per_layer: bool = True) -> Cost:
        cost = estimate(view, policy)  # the per-layer shapes are what the latency is looked up by
        volume = activation_volume(view, cost)
        total = int8_share = 0.0
        shapes = layer_shapes(view, cost)
        for name, shape in shapes.items():
            fit, share = self.fits[shape.int8], volume[name] / self.volume
            ms = fit.scale * self.conv_ms(shape) + fit.per_act_ms * share
            cost.per_layer[name]["latency_ms"] = ms
            total += ms
            int8_share += share if shape.int8 else 0.0
        for layer, p8 in self._kept_branches(policy, shapes).values():  # charged to the conv that decides it
            cost.per_layer[layer]["latency_ms"] += self.branch_ms[p8]
            total += self.branch_ms[p8]
        q = int8_share / max(sum(volume.values()) / self.volume, 1e-12)
        cost.latency_ms = total + (1 - q) * self.fits[False].const_ms + q * self.fits[True].const_ms
        return cost
