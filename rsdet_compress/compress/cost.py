"""Exact analytic cost of a compression policy: params, storage bits, MACs/FLOPs and BOPs.

``estimate(view, policy)`` answers, without building anything, what the
physically compressed detector costs at the view's input size. It is what the
search calls once per candidate, so everything that does not depend on the
policy (per-layer shapes, channel maps, block membership, the non-conv FLOPs)
is computed once per :class:`~rsdet_compress.compress.view.CompressibleView`
and cached (weakly, on the view object).

Counting conventions (all integers, all exact):

* **Channels.** A conv's kept output/input channels are derived from the
  view's per-group channel maps (``ChannelGroup.plan``), i.e. exactly the
  tensor indices that applying the policy removes. For a one-to-one map this
  is ``policy.kept_count(view, group, size)``; a concat consumer (C2f ``cv2``,
  SPPF ``cv2``, the FPN's ``cv1``) follows several groups, some of them more
  than once (a C2f residual group feeds ``cv2`` once per bottleneck), and its
  input side shrinks by the sum of them. A depthwise conv keeps
  ``groups = in = out`` kept channels. For a keep *ratio* on a group whose
  map is not uniform (each group channel -> same number of tensor channels),
  which channels survive is not known before importance ranking, so the
  removed count is the proportional share (rounded); ``keep_idx`` is always
  exact and agrees with ``CompressibleView.kept`` (which raises instead of
  estimating in that one case).
* **MACs** of a conv = ``out_h * out_w * out_c' * (in_c' / groups') * kh * kw``
  (out_h, out_w at the view's imgsz). ``flops = 2 * macs + non-conv FLOPs``;
  the non-conv FLOPs (YOLO11's attention matmuls in ``PSABlock``) are measured
  once per view with ``torch.utils.flop_counter.FlopCounterMode`` and
  attributed to the innermost skippable block containing them (else
  ``"global"``); they disappear with a skipped block and do not change with
  pruning (attention channels are protected). This equals FlopCounterMode on
  the (pruned) model: it counts no bias, BN or activation FLOPs either.
* **Params** = kept weights + bias + 2 BN affine values per kept output
  channel: what ``sum(p.numel() for p in model.parameters())`` of the
  physically pruned model counts.
* **Storage bits** (``Cost.weight_bits``), per conv layer::

      sum over kept output channels c of  n_w * b_c  +  (32 if b_c < 32 else 0)
      + 64 * out_c'   if the layer has a BatchNorm or a bias, else 0

  where ``n_w = (in_c' / groups') * kh * kw`` weights per output channel and
  ``b_c`` the channel's weight bit-width (the policy layer's ``weight_bits``,
  an int or one int per kept output channel, default
  ``policy.default_weight_bits``; protected layers and ``policy=None`` are
  float, 32). Each quantized channel stores one fp32 scale; bias and BN are
  stored folded as two fp32 values per output channel (scale and shift).
  Consequently the float model's storage is NOT ``32 * params``: it is
  ``32 * (weights + 2 * out_c)`` per layer with BN or bias, i.e.
  ``32 * params`` minus ``32 * out_c`` for each conv with both a bias and a
  BN, plus ``32 * out_c`` for each conv with a bias and no BN (the
  detection head's final convs).
* **BOPs** = ``sum over conv layers, kept output channels c of
  macs_c * b_c * a`` with ``macs_c = out_h * out_w * n_w`` and ``a`` the
  layer's input activation bits (``act_bits``, default
  ``policy.default_act_bits``; protected layers / no policy: 32). Only conv
  MACs count; the (float) non-conv FLOPs are reported separately in
  ``Cost.nonconv_flops``.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass, field

import torch

from rsdet_compress.compress.policy import Policy
from rsdet_compress.compress.quant import FLOAT_BITS

#: bits of one fp32 quantization scale per quantized output channel.
SCALE_BITS = 32
#: bits of a folded bias/BN per output channel: two fp32 values (scale, shift).
FOLDED_BITS = 64


@dataclass
class Cost:
    """What a (compressed) detector costs at the view's input size. See the module docstring."""

    params: int
    weight_bits: int  # storage, in bits
    macs: int  # conv multiply-accumulates
    flops: int  # 2 * macs + non-conv FLOPs (FlopCounterMode's convention)
    bops: int  # bit operations of the convs: sum macs_c * weight bits_c * act bits
    nonconv_flops: int = 0  # part of ``flops`` that is not conv (attention matmuls)
    per_layer: dict[str, dict] = field(default_factory=dict, repr=False)
    #: predicted latency (ms), set only where a measured latency table is in use (search.latency_cost)
    latency_ms: float = 0.0

    @property
    def size_bytes(self) -> int:
        return math.ceil(self.weight_bits / 8)

    @property
    def size_mb(self) -> float:
        """Storage in MB (10^6 bytes)."""
        return self.size_bytes / 1e6

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def gbops(self) -> float:
        return self.bops / 1e9

    def ratios(self, ref: Cost) -> dict[str, float]:
        """How many times smaller than ``ref`` (e.g. the float model's ``estimate(view)``)."""
        def div(a: int, b: int) -> float:
            return a / b if b else math.inf
        out = {"size": div(ref.weight_bits, self.weight_bits), "flops": div(ref.flops, self.flops),
               "bops": div(ref.bops, self.bops), "params": div(ref.params, self.params),
               "macs": div(ref.macs, self.macs)}
        if self.latency_ms and ref.latency_ms:
            out["latency"] = ref.latency_ms / self.latency_ms
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "size_bytes": self.size_bytes, "size_mb": self.size_mb,
                "gflops": self.gflops, "gbops": self.gbops}


# ------------------------------------------------------------------ per-view precomputation
@dataclass
class _Entry:
    """How one group's channels map onto one side (in or out) of one conv."""

    group: str
    size: int  # group size
    pairs: int  # tensor channels of this conv following the group
    mult: int | None  # channels per group channel when uniform over the whole group, else None
    per_root: list[int] | None  # tensor channels per group channel when not uniform


@dataclass
class _Layer:
    name: str
    protected: bool
    depthwise: bool
    out_c: int
    in_c: int
    groups: int
    khw: int
    ohw: int
    extra: int  # params per output channel besides weights (bias + 2 BN)
    folded: bool  # has a bias or a BN: 64 storage bits per output channel
    outs: list[_Entry]
    ins: list[_Entry]
    blocks: tuple[str, ...]  # skippable blocks containing it (outermost first)


@dataclass
class _Prepared:
    layers: list[_Layer]
    nonconv: dict[str, int]  # owner (innermost block or "global") -> FLOPs
    owner_blocks: dict[str, tuple[str, ...]]  # owner -> blocks whose skip removes it


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NONCONV: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _entry(group, pairs: list) -> _Entry:
    per_root = [0] * group.size
    for _, root in pairs:
        per_root[root] += 1
    m = per_root[0] if per_root else 0
    uniform = m > 0 and all(c == m for c in per_root)
    return _Entry(group.name, group.size, len(pairs), m if uniform else None, None if uniform else per_root)


def _prepare(view) -> _Prepared:
    got = _CACHE.get(view)
    if got is not None:
        return got
    is_out = view.graph.is_out_channel_pruning_fn
    sides: dict[tuple[str, bool], dict[str, set]] = {}  # (conv, is out) -> group -> {(idx, group channel)}
    for group in view.groups.values():
        for mod, handler, pairs in group.plan:
            if mod in view.layers:  # BN and functional nodes follow their conv
                sides.setdefault((mod, bool(is_out(handler))), {}).setdefault(group.name, set()).update(pairs)
    outs: dict[str, list[_Entry]] = {}
    ins: dict[str, list[_Entry]] = {}
    for (mod, out), by_group in sides.items():
        (outs if out else ins)[mod] = [_entry(view.groups[g], sorted(p)) for g, p in by_group.items()]
    block_of: dict[str, list[str]] = {}
    for b in sorted(view.blocks, key=lambda b: b.name.count(".")):
        for name in b.layers:
            block_of.setdefault(name, []).append(b.name)
    layers = []
    for name, info in view.layers.items():
        kh, kw = info.kernel
        layers.append(_Layer(
            name, info.protected, info.kind == "depthwise" and info.groups > 1, info.out_channels,
            info.in_channels, info.groups, kh * kw, info.out_hw[0] * info.out_hw[1],
            (1 if info.has_bias else 0) + (2 if info.bn else 0), bool(info.has_bias or info.bn),
            outs.get(name, []), ins.get(name, []), tuple(block_of.get(name, ()))))
    nonconv = nonconv_flops(view)
    names = {b.name for b in view.blocks}
    owner_blocks = {o: tuple(b for b in names if o == b or o.startswith(b + ".")) for o in nonconv}
    prepared = _Prepared(layers, nonconv, owner_blocks)
    _CACHE[view] = prepared
    return prepared


def nonconv_flops(view) -> dict[str, int]:
    """Non-conv FLOPs of the float model at the view's imgsz, by owner (innermost skippable block or "global").

    Measured once per view (one forward pass under FlopCounterMode, eval mode) and cached.
    Owners with zero FLOPs are omitted.
    """
    got = _NONCONV.get(view)
    if got is not None:
        return dict(got)
    from torch.utils.flop_counter import FlopCounterMode

    model = view.model
    was_training = model.training
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(torch.zeros(1, 3, view.imgsz, view.imgsz, device=device))
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()

    def nonconv(key: str) -> int:
        return sum(n for op, n in counts.get(key, {}).items() if "convolution" not in str(op))

    total = nonconv("Global")
    root = type(model).__name__
    inside = {b.name: nonconv(f"{root}.{b.name}") for b in view.blocks}
    out: dict[str, int] = {}
    for name, n in inside.items():
        inner = [c for c in inside if c.startswith(name + ".")]
        maximal = [c for c in inner if not any(c.startswith(o + ".") for o in inner if o != c)]
        own = n - sum(inside[c] for c in maximal)
        if own:
            out[name] = own
    rest = total - sum(out.values())
    if rest:
        out["global"] = rest
    _NONCONV[view] = dict(out)
    return out


# ------------------------------------------------------------------------------ estimate
def _removed(entry: _Entry, policy: Policy, view, kept_sets: dict) -> int:
    """Tensor channels of one conv side that the policy's choice for ``entry.group`` removes."""
    spec = policy.groups.get(entry.group)
    if not spec:
        return 0
    if "keep_idx" in spec:
        keep = kept_sets.get(entry.group)
        if keep is None:
            keep = kept_sets[entry.group] = set(spec["keep_idx"])
        if entry.mult is not None:
            return entry.mult * (entry.size - len(keep))
        return entry.pairs - sum(entry.per_root[r] for r in keep)
    kept = policy.kept_count(view, entry.group, entry.size)
    if entry.mult is not None:
        return entry.mult * (entry.size - kept)
    return round(entry.pairs * (entry.size - kept) / entry.size)


def kept_channels(view, layer: str, dim: str, policy: Policy) -> int:
    """Channels of ``layer``'s ``dim`` ("out" or "in") that ``policy`` keeps, from the same maps as :func:`estimate`.

    A keep ratio on a group that feeds this side unevenly (part of a concat
    into a depthwise conv) depends on which channels the ranking keeps:
    resolve the policy first (ValueError otherwise).
    """
    L = next(x for x in _prepare(view).layers if x.name == layer)
    if dim == "in" and L.depthwise:
        dim = "out"
    entries, total = (L.outs, L.out_c) if dim == "out" else (L.ins, L.in_c)
    for e in entries:
        spec = policy.groups.get(e.group)
        if spec and "keep" in spec and e.mult is None:
            raise ValueError(f"{layer}: carries part of group {e.group} unevenly; resolve the policy first")
    return total - sum(_removed(e, policy, view, {}) for e in entries)


def estimate(view, policy: Policy | None = None, per_layer: bool = True) -> Cost:
    """Exact cost of ``policy`` applied to ``view``'s detector (``None``: the float model).

    See the module docstring for the conventions. ``per_layer=False`` skips the
    per-layer breakdown (a little faster for search loops).
    """
    prep = _prepare(view)
    policy = policy or Policy(detector=view.detector or "")
    skipped = set(policy.skipped)
    spec_layers = policy.layers
    dw_bits, da_bits = policy.default_weight_bits, policy.default_act_bits
    kept_sets: dict[str, set] = {}
    params = storage = macs = bops = 0
    breakdown: dict[str, dict] = {}
    for L in prep.layers:
        if skipped and any(b in skipped for b in L.blocks):
            continue
        out_c = L.out_c - sum(_removed(e, policy, view, kept_sets) for e in L.outs) if L.outs else L.out_c
        if L.depthwise:
            in_c = groups = out_c
        else:
            groups = L.groups
            in_c = L.in_c - sum(_removed(e, policy, view, kept_sets) for e in L.ins) if L.ins else L.in_c
        n_w = (in_c // groups) * L.khw
        if L.protected:
            wbits, abits = FLOAT_BITS, FLOAT_BITS
        else:
            spec = spec_layers.get(L.name) or {}
            wbits, abits = spec.get("weight_bits", dw_bits), spec.get("act_bits", da_bits)
        if isinstance(wbits, list):
            if len(wbits) != out_c:
                raise ValueError(f"layer {L.name}: {len(wbits)} weight bit-widths for {out_c} kept output channels")
            bit_sum = sum(wbits)
            n_quant = sum(1 for b in wbits if b < FLOAT_BITS)
        else:
            bit_sum = wbits * out_c
            n_quant = out_c if wbits < FLOAT_BITS else 0
        l_params = out_c * (n_w + L.extra)
        l_storage = n_w * bit_sum + SCALE_BITS * n_quant + (FOLDED_BITS * out_c if L.folded else 0)
        macs_c = L.ohw * n_w
        l_macs = macs_c * out_c
        l_bops = macs_c * bit_sum * abits
        params += l_params
        storage += l_storage
        macs += l_macs
        bops += l_bops
        if per_layer:
            breakdown[L.name] = {"params": l_params, "macs": l_macs, "bops": l_bops, "weight_bits": l_storage,
                                 "mean_weight_bits": bit_sum / out_c if out_c else 0.0, "act_bits": abits,
                                 "in_channels": in_c, "out_channels": out_c, "groups": groups}
    nonconv = sum(n for owner, n in prep.nonconv.items()
                  if not (skipped and any(b in skipped for b in prep.owner_blocks[owner])))
    return Cost(params=params, weight_bits=storage, macs=macs, flops=2 * macs + nonconv, bops=bops,
                nonconv_flops=nonconv, per_layer=breakdown)


def _num(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{x:.0f}"


def format_cost(cost: Cost, ref: Cost | None = None) -> str:
    """One line for the terminal: params, size, GFLOPs, GBOPs (and how many times smaller than ``ref``)."""
    line = (f"params {_num(cost.params)} | size {cost.size_mb:.3f} MB | {cost.gflops:.3f} GFLOPs | "
            f"{cost.gbops:.2f} GBOPs")
    if ref is not None:
        r = cost.ratios(ref)
        line += (f" | vs ref: {r['size']:.2f}x smaller, {r['flops']:.2f}x fewer FLOPs, "
                 f"{r['bops']:.2f}x fewer BOPs, {r['params']:.2f}x fewer params")
    return line
