"""Block reconstruction: fit each layer of a compressed detector to reproduce the float detector's output.

The post-training recovery of BRECQ / QDrop, for pruned and quantized
detectors: units (top-level layers, :mod:`rsdet_compress.compress.units`) are
fitted one after another, in forward order. A unit's input comes from the
already-fitted compressed units before it, its target from the float model on
the float input, sliced to the channels the compressed unit kept; so each
unit also compensates what earlier units could not recover. Per unit:

0. (with ``least_squares``) each conv re-fitted in closed form to the float conv's output
   (:mod:`rsdet_compress.compress.compensate`), then each quantized weight channel clipped to
   the fraction of max|w| with the least rounding error;
1. activation ranges re-fit: each of the unit's activation quantizers tries
   its calibrated min/max range shrunk by a few factors and keeps the one with
   the lowest quantization error of its input (the MSE range search of
   TensorRT/OpenVINO calibrators: clipping outliers buys resolution for the rest);
2. weights (and BN affine, biases) by Adam on the output MSE, through the
   straight-through fake quantization, so rounding decisions may flip: the
   learned-rounding idea of AdaRound without its extra variables. A pruned
   layer's consumers re-fit themselves to the channels left (the
   least-squares compensation of ThiNet/CaP, reached by gradient steps);
3. QDrop: during the fit, each input element is the compressed or the float
   activation with probability ``drop``, which flattens the loss surface in
   the directions the next units' errors will push.

Structure and bit-widths never change: only values of existing Parameters
and of activation ranges move. Everything runs on the images given (training
chips), held in memory per unit: the live activations of both models, kept in
fp16 (``half_cache``) and computed on in fp32.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rsdet_compress.compress.compensate import compensate
from rsdet_compress.compress.fit_budget import FitBudget
from rsdet_compress.compress.quant import ActQuantizer, QConv2d, clip_weight_ranges
from rsdet_compress.compress.units import Unit, select


@dataclass
class ReconstructConfig:
    """How hard each unit is fitted. Every field is also a ``recover`` flag."""

    #: Adam steps per unit after the least-squares re-fit. On a small, lightly pruned model the re-fit does most of
    #: the work (test model, w4a8, 25% pruned: LS alone 0.367 val mAP50, LS + 20 steps 0.370); deeply pruned real
    #: models need the steps (airbus YOLOv8n, w8a8, 50% sparse: 300 steps -1.63 test mAP50 vs fp32, 600 -0.66, in
    #: 17 and 24 minutes on 2 CPU cores). BRECQ uses 20k on a GPU; --budget-minutes caps the time.
    iters: int = 600
    #: images per step; small batches suit 2 CPU cores, the activation cache holds every image anyway.
    batch: int = 8
    #: Adam learning rate of conv weights: about a 4-bit quantization step over ~100 steps, so rounding can flip.
    lr: float = 1e-4
    #: learning rate of biases and BN affine parameters (outputs scale: larger steps are safe).
    bias_lr: float = 1e-3
    #: QDrop probability of replacing a compressed input element by the float one during fitting.
    drop: float = 0.5
    #: shrink factors tried for each activation range (1.0 = the calibrated min/max); each costs one rounding.
    range_factors: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4)
    #: fractions of max|w| tried as each quantized weight channel's range after the least-squares re-fit (1.0 =
    #: unclipped; ``(1.0,)`` turns the search off); the least rounding error wins and is baked into the weights.
    weight_clip_factors: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
    #: closed-form least-squares re-fit of each conv (and its BN reset to the float one's) before the Adam steps.
    least_squares: bool = True
    #: chips the least-squares re-fit, the range searches and the reported errors run on (the Adam steps draw from
    #: all): each costs a few unit forwards over them, and 64 chips of 640 px already give the least squares
    #: thousands of pixels per weight.
    probe_images: int = 64
    #: seeds the batch sampling, the QDrop masks and the range searches' element samples.
    seed: int = 0
    #: keep the cached activations (inputs and targets of every unit, both models) in fp16, computing in fp32:
    #: half the memory, so twice the chips fit (SkyNet at 416 px: 256 chips need ~20 GiB in fp32). fp16 rounds
    #: a target by ~5e-4 of its value, far below the 4-bit quantization errors being fitted.
    half_cache: bool = True

    @property
    def cache_dtype(self) -> torch.dtype:
        return torch.float16 if self.half_cache else torch.float32


def _inputs(store: dict[int, Tensor], source: int | list[int], index: int, rows: Tensor | slice):
    """A unit's input for ``rows`` of the stored outputs (ultralytics' ``m.f`` convention)."""
    def get(j: int) -> Tensor:
        return store[index - 1 if j == -1 else j][rows].float()
    return [get(j) for j in source] if isinstance(source, list) else get(source)


def _source_maps(units: list[Unit], unit: Unit) -> list[Tensor | None] | Tensor | None:
    def get(j: int):
        k = unit.index - 1 if j == -1 else j
        return units[k].out_map if k >= 0 else None
    return [get(j) for j in unit.source] if isinstance(unit.source, list) else get(unit.source)


def _flat(out) -> list[Tensor]:
    """The tensors a unit's output is compared on: a tensor, or a head's raw prediction dict (no features)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, tuple):  # Detect in eval mode: (decoded, raw dict)
        return _flat(out[1])
    if isinstance(out, dict):
        return [t for k in sorted(out) if k != "feats" for t in _flat(out[k])]
    if isinstance(out, list):
        return [t for o in out for t in _flat(o)]
    raise TypeError(f"cannot compare a unit output of type {type(out).__name__}")


def _mix(xc, xf, maps, drop: float, gen: torch.Generator):
    """QDrop: each element from the float input (sliced to the kept channels) with probability ``drop``."""
    if isinstance(xc, list):
        return [_mix(c, f, m, drop, gen) for c, f, m in zip(xc, xf, maps, strict=True)]
    f = select(xf, maps)
    keep = torch.rand(xc.shape, generator=gen, device=xc.device) >= drop
    return torch.where(keep, xc, f)


class _Store:
    """Live layer outputs of one model over all images (what later layers still read), on the CPU."""

    def __init__(self, images: Tensor, needed: dict[int, int]) -> None:
        self.data: dict[int, Tensor] = {-1: images}
        self.needed = needed  # layer -> last layer that reads it

    def put(self, index: int, value: Tensor | None) -> None:
        if value is not None:
            self.data[index] = value
        for k in [k for k in self.data if k >= 0 and self.needed.get(k, -1) <= index]:
            del self.data[k]
        if index >= 0 and -1 in self.data:
            del self.data[-1]


def _readers(units: list[Unit]) -> dict[int, int]:
    """For each layer, the last layer that reads its output."""
    last: dict[int, int] = {}
    for u in units:
        for j in u.source if isinstance(u.source, list) else [u.source]:
            last[u.index - 1 if j == -1 else j] = u.index
    return last


@torch.no_grad()
def _run(module: nn.Module, store: dict[int, Tensor], unit: Unit, n: int, chunk: int,
         dtype: torch.dtype) -> Tensor | list[Tensor]:
    """``module`` over all ``n`` stored inputs in chunks: a tensor, or a head's flattened outputs (in ``dtype``)."""
    outs = []
    for s in range(0, n, chunk):
        out = module(_inputs(store, unit.source, unit.index, slice(s, s + chunk)))
        outs.append(out.to(dtype) if isinstance(out, Tensor) else [t.to(dtype) for t in _flat(out)])
    if isinstance(outs[0], Tensor):
        return torch.cat(outs)
    return [torch.cat(parts) for parts in zip(*outs, strict=True)]


def _error(pred: list[Tensor], target: list[Tensor]) -> Tensor:
    """Relative squared error: sum of squared differences over the target's sum of squares."""
    num = sum(((p - t) ** 2).sum() for p, t in zip(pred, target, strict=True))
    den = sum((t ** 2).sum() for t in target)
    return num / den.clamp_min(1e-12)


def _as_list(x) -> list[Tensor]:
    return x if isinstance(x, list) else [x]


def _unit_error(unit: Unit, store: dict[int, Tensor], target: list[Tensor], rows: Tensor | slice) -> float:
    with torch.no_grad():
        return float(_error(_flat(unit.compressed(_inputs(store, unit.source, unit.index, rows))),
                            [t[rows].float() for t in target]))


#: activation elements a range search scores each shrink factor on (a seeded sample of the probe images' input): the
#: error of a 2^20-element mean is well under 1% of it, and rounding a full early-layer input 13 times cost most of
#: a recovery (YOLOv8n at 640 px, 32 chips: 92 of 183 s)
RANGE_SAMPLE = 2 ** 20


def _fit_ranges(unit: Unit, store: dict[int, Tensor], rows: Tensor, factors: tuple[float, ...],
                gen: torch.Generator) -> int:
    """Shrink each calibrated activation range of the unit to the factor with the least quantization error.

    The error is the activation's own (``|q(x) - x|^2`` over the probe images, at most
    :data:`RANGE_SAMPLE` elements of it): one forward captures every quantizer's input, each factor
    then costs one rounding of the sample.
    """
    quantizers = [m for m in unit.compressed.modules()
                  if isinstance(m, ActQuantizer) and m.enabled and bool(m.observed)]
    if not quantizers:
        return 0
    seen: dict[ActQuantizer, Tensor] = {}
    hooks = [q.register_forward_pre_hook(lambda mod, a: seen.__setitem__(mod, a[0].detach())) for q in quantizers]
    try:
        with torch.no_grad():
            unit.compressed(_inputs(store, unit.source, unit.index, rows))
    finally:
        for h in hooks:
            h.remove()
    changed = 0
    with torch.no_grad():
        for q in quantizers:
            x = seen.get(q)
            if x is None:
                continue
            if x.numel() > RANGE_SAMPLE:
                x = x.flatten()[torch.randint(0, x.numel(), (RANGE_SAMPLE,), generator=gen).to(x.device)]
            lo, hi = q.lo.clone(), q.hi.clone()
            errors = []
            for f in factors:
                q.lo.copy_(lo * f)
                q.hi.copy_(hi * f)
                errors.append(float(((q(x) - x) ** 2).mean()))
            best = factors[min(range(len(factors)), key=errors.__getitem__)]
            q.lo.copy_(lo * best)
            q.hi.copy_(hi * best)
            changed += best != 1.0
    return changed


def _fit_weights(unit: Unit, units: list[Unit], cstore: dict[int, Tensor], fstore: dict[int, Tensor],
                 target: list[Tensor], n: int, cfg: ReconstructConfig, gen: torch.Generator,
                 deadline: float | None) -> int:
    """Adam on the unit's output error; returns the steps taken (fewer when the deadline comes first)."""
    module = unit.compressed
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]  # not DFL's fixed conv
    weights = [p for name, p in trainable if name.endswith("weight") and p.dim() > 1]
    others = [p for name, p in trainable if not (name.endswith("weight") and p.dim() > 1)]
    if not trainable:
        return 0
    params = weights + others
    opt = torch.optim.Adam([{"params": weights, "lr": cfg.lr}, {"params": others, "lr": cfg.bias_lr}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.iters, 1))
    maps = _source_maps(units, unit)
    steps = 0
    try:
        for _ in range(cfg.iters):
            if deadline is not None and time.monotonic() > deadline:
                break
            rows = torch.randint(0, n, (min(cfg.batch, n),), generator=gen)
            xc = _inputs(cstore, unit.source, unit.index, rows)
            if cfg.drop > 0 and unit.index > 0:
                xc = _mix(xc, _inputs(fstore, unit.source, unit.index, rows), maps, cfg.drop, gen)
            loss = _error(_flat(module(xc)), [t[rows].float() for t in target])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
    finally:
        for p in params:
            p.grad = None
    return steps


def step_seconds(units: list[Unit], images: Tensor, repeats: int = 2) -> list[float]:
    """Seconds of one fitting step (forward and backward) of each unit on ``images``; 0 where nothing trains.

    A wall-clock budget is shared out by these: a detector's first units run on full-resolution maps and
    cost many times a late unit per step, so an even split would cut them short while the last units
    finish early and leave their time unused. A few passes of the compressed model over one batch.
    """
    store: dict[int, Tensor] = {-1: images.float()}
    costs = []
    for u in units:
        u.compressed.eval()
        params = [p for p in u.compressed.parameters() if p.requires_grad]
        x = _inputs(store, u.source, u.index, slice(None))
        if params:  # untimed, on one image: allocations; and a head re-makes the anchors it caches per input
            with torch.no_grad():  # shape, which an inference-mode evaluation may have left unusable for autograd
                u.compressed(_inputs(store, u.source, u.index, slice(0, 1)))
        times = []
        for _ in range(repeats if params else 1):  # the fastest of a few
            t0 = time.monotonic()
            with torch.set_grad_enabled(bool(params)):
                out = u.compressed(x)
                if params:
                    sum(t.float().square().mean() for t in _flat(out)).backward()
                    for p in params:
                        p.grad = None
            times.append(time.monotonic() - t0)
        costs.append(max(min(times), 1e-6) if params else 0.0)
        if not u.head:
            store[u.index] = out.detach()
    return costs


def activation_bytes(units: list[Unit], imgsz: int, n: int, dtype: torch.dtype = torch.float16) -> int:
    """Peak bytes of the activations :func:`reconstruct` keeps for ``n`` images (both models, in ``dtype``).

    One probe image through the float layers gives each output's size; a layer's output lives
    until the last layer that reads it, as in :class:`_Store` (plus the image batch itself).
    """
    device = next(units[0].float.parameters()).device
    readers = _readers(units)
    sizes: dict[int, int] = {-1: 3 * imgsz * imgsz}
    outs: dict[int, Tensor] = {-1: torch.zeros(1, 3, imgsz, imgsz, device=device)}
    peak = live = sizes[-1]
    with torch.inference_mode():
        for u in units:
            out = u.float(_inputs(outs, u.source, u.index, slice(None)))
            if isinstance(out, Tensor):
                outs[u.index] = out
                sizes[u.index] = out[0].numel()
                live += sizes[u.index]
            peak = max(peak, live)
            for k in [k for k in sizes if readers.get(k, -1) <= u.index and k in outs]:
                live -= sizes[k]
                del outs[k]
    return 2 * dtype.itemsize * n * peak


def reconstruct(units: list[Unit], images: Tensor, cfg: ReconstructConfig, budget_seconds: float | None = None,
                chunk: int = 16, progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Fit every unit of the compressed model (in place) on ``images`` (float, 0..1, N x 3 x H x W).

    Returns one row per unit: ``layer``, ``error_before`` / ``error_after`` (relative squared
    error of its output against the float target, on its own inputs), ``steps``,
    ``ranges_shrunk``, ``weights_clipped``, ``kept_input``, ``seconds``. A unit whose fit ends with a
    larger error than it started with keeps its input weights (``kept_input``). ``budget_seconds``
    caps the wall-clock time, shared out over the units by their :func:`step_seconds`
    (:class:`FitBudget`; an upsample or concat takes none).
    ``progress`` is called with each row.
    """
    n = len(images)
    gen = torch.Generator().manual_seed(cfg.seed)
    needed = _readers(units)
    images = images.to(cfg.cache_dtype)  # 0..1 in 1/255 steps: fp16 keeps each within 5e-4 of its value
    fstore, cstore = _Store(images, needed), _Store(images, needed)  # outputs come from _run in cache_dtype
    probe = torch.arange(min(n, cfg.probe_images))
    start = time.monotonic()
    modes = {m: m.training for u in units for m in (u.float, u.compressed)}
    rows: list[dict] = []
    try:
        budget = None if budget_seconds is None else FitBudget(budget_seconds, step_seconds(units, images[:cfg.batch]),
                                                             start)
        for pos, u in enumerate(units):
            u.float.eval()
            u.compressed.eval()
            t0 = time.monotonic()
            # what the next float layers read: every channel
            fout = _run(u.float, fstore.data, u, n, chunk, cfg.cache_dtype)
            target = _as_list(fout if u.head else select(fout, u.out_map))
            before = _unit_error(u, cstore.data, target, probe)
            steps = shrunk = clipped = 0
            fit = before > 1e-10 and any(True for _ in u.compressed.parameters())
            start_state = {k: v.clone() for k, v in u.compressed.state_dict().items()} if fit else {}
            refitted: dict[nn.Conv2d, int] = {}
            fitting = 0.0
            if fit and cfg.least_squares:
                refitted = compensate(u.float, u.compressed, _inputs(fstore.data, u.source, u.index, probe),
                                      _inputs(cstore.data, u.source, u.index, probe), u.name, u.module_maps,
                                      u.bn_of, gen, cfg.weight_clip_factors)
            if fit:  # convs the least squares left alone (depthwise, or all of them without it) are clipped here
                clipped = sum(refitted.values()) + sum(
                    clip_weight_ranges(m, cfg.weight_clip_factors) for m in u.compressed.modules()
                    if isinstance(m, QConv2d) and m.weight.requires_grad and m not in refitted)
                shrunk = _fit_ranges(u, cstore.data, probe, cfg.range_factors, gen)
                t1 = time.monotonic()
                deadline = budget.deadline(pos, t0, t1) if budget else None
                steps = _fit_weights(u, units, cstore.data, fstore.data, target, n, cfg, gen, deadline)
                fitting = time.monotonic() - t1
            after = _unit_error(u, cstore.data, target, probe) if fit else before
            kept_input = after > before  # the fit made the unit worse on the probe chips: undo it
            if kept_input:
                u.compressed.load_state_dict(start_state)
            if not u.head:
                cout = _run(u.compressed, cstore.data, u, n, chunk, cfg.cache_dtype)
                fstore.put(u.index, fout if u.index in needed else None)
                cstore.put(u.index, cout if u.index in needed else None)
            row = {"layer": u.name, "error_before": before, "error_after": min(after, before), "steps": steps,
                   "ranges_shrunk": shrunk, "weights_clipped": clipped, "kept_input": kept_input,
                   "seconds": round(time.monotonic() - t0, 2)}
            if budget:
                budget.done(pos, row["seconds"], fitting)
            rows.append(row)
            if progress is not None:
                progress(row)
    finally:
        for m, training in modes.items():
            m.train(training)
    return rows
