"""Least-squares compensation: re-fit a conv of a compressed unit to the float conv's output, in closed form.

When pruning removes input channels of a conv (or earlier layers shifted its
input), the conv's remaining weights are no longer the best linear map from
what it now receives to what the float conv produced. ThiNet and CaP re-fit
them by least squares; here each conv of a unit, in execution order, gets

    W' = argmin ||unfold(X_c) W'^T - Y_f||^2 + ridge * ||W'||^2

with ``X_c`` the compressed conv's actual (activation-quantized) input and
``Y_f`` the float conv's output on the float input, sliced to the kept output
channels. Its BatchNorm then takes the float BN's statistics and affine
parameters (the conv output it normalises is the float one again), and a
quantized conv's weight range is clipped right away
(:func:`~rsdet_compress.compress.quant.clip_weight_ranges`), so the convs after
it are fitted to its final rounded weights. Grouped convs (depthwise) are left
to the gradient fit. Pixels are sampled so the normal equations stay small.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from rsdet_compress.compress.quant import QConv2d, clip_weight_ranges

#: ridge term relative to the mean diagonal of X^T X: keeps nearly collinear inputs from blowing weights up
RIDGE = 1e-3
#: sampled output pixels per conv (rows of the regression): a few times the widest conv's 9 x 256 inputs
PIXELS = 16384


class _Seen(Exception):
    """Raised by the input hook once its conv's input is captured: the rest of the forward is not needed."""


def _capture(targets: list[nn.Module], run: Callable[[], object], what: str) -> dict:
    """Inputs (``what="in"``: one target, the forward stops there) or outputs of ``targets`` during ``run()``."""
    seen: dict[nn.Module, Tensor] = {}

    def grab_input(m, a):
        seen[m] = a[0].detach()
        raise _Seen

    if what == "in":
        hooks = [t.register_forward_pre_hook(grab_input) for t in targets]
    else:
        hooks = [t.register_forward_hook(lambda m, a, o: seen.__setitem__(m, o.detach())) for t in targets]
    try:
        with torch.no_grad():
            run()
    except _Seen:
        pass
    finally:
        for h in hooks:
            h.remove()
    return seen


def refit(conv: nn.Conv2d, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """Ridge least squares for ``conv``'s weight (and bias) mapping input ``x`` to output ``y``.

    The normal equations are accumulated image by image over :data:`PIXELS` sampled output
    pixels in all, so memory stays at one image's unfolded input.
    """
    per = max(1, -(-PIXELS // x.shape[0]))
    bias = conv.bias is not None
    gram = rhs = None
    for b in range(x.shape[0]):
        cols = nn.functional.unfold(x[b:b + 1], conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                                    stride=conv.stride)[0]  # (Cin*k*k, L)
        pick = torch.randperm(cols.shape[1], generator=gen)[:per].to(cols.device)
        feats = cols[:, pick].T.double()
        target = y[b].flatten(1)[:, pick].T.double()
        if bias:
            feats = torch.cat([feats, torch.ones(len(feats), 1, dtype=feats.dtype, device=feats.device)], 1)
        gram = feats.T @ feats if gram is None else gram + feats.T @ feats
        rhs = feats.T @ target if rhs is None else rhs + feats.T @ target
    gram += torch.eye(len(gram), dtype=gram.dtype, device=gram.device) * RIDGE * gram.diagonal().mean().clamp_min(1e-12)
    sol = torch.linalg.solve(gram, rhs).T.float()  # (Cout, Cin*k*k [+1])
    w = sol[:, :-1] if bias else sol
    return w.reshape(conv.weight.shape), (sol[:, -1] if bias else None)


def compensate(float_unit: nn.Module, comp_unit: nn.Module, float_in, comp_in, prefix: str,
               out_maps: dict[str, list[int]], bn_of: dict[str, str], gen: torch.Generator,
               clip_factors: tuple[float, ...] = ()) -> dict[nn.Conv2d, int]:
    """Re-fit every plain (ungrouped) conv of ``comp_unit`` in execution order.

    ``float_in`` / ``comp_in``: the unit's inputs (a probe batch); ``prefix``: the unit's module
    path (``model.3``); ``out_maps``: kept output channels of pruned modules (float numbering);
    ``bn_of``: conv path -> the BatchNorm path that follows it; ``clip_factors``: weight range
    fractions tried after each re-fit. Returns each re-fitted conv with its clipped channel count.
    """
    fmods = dict(float_unit.named_modules(prefix=prefix))
    cmods = dict(comp_unit.named_modules(prefix=prefix))
    order: list[str] = []
    convs = [m for n, m in cmods.items() if isinstance(m, nn.Conv2d) and n in fmods]
    names = {m: n for n, m in cmods.items()}
    hooks = [c.register_forward_pre_hook(lambda m, a: order.append(names[m])) for c in convs]
    try:
        with torch.no_grad():
            comp_unit(comp_in)
    finally:
        for h in hooks:
            h.remove()
    targets = _capture([fmods[n] for n in order], lambda: float_unit(float_in), "out")
    fitted: dict[nn.Conv2d, int] = {}
    for name in dict.fromkeys(order):
        conv = cmods[name]
        if conv.groups != 1 or not conv.weight.requires_grad:  # depthwise; fixed (DFL's expectation conv)
            continue
        x = _capture([conv], lambda: comp_unit(comp_in), "in")[conv]
        if isinstance(conv, QConv2d):
            x = conv.act_quant(x)
        y = targets[fmods[name]]
        if name in out_maps:
            y = y.index_select(1, torch.tensor(out_maps[name], dtype=torch.long, device=y.device))
        if y.shape[1] != conv.out_channels:
            continue
        w, b = refit(conv, x, y, gen)
        with torch.no_grad():
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
            bn_name = bn_of.get(name)
            if bn_name in cmods and bn_name in fmods:
                fbn, cbn = fmods[bn_name], cmods[bn_name]
                keep = torch.tensor(out_maps[bn_name] if bn_name in out_maps else range(fbn.num_features),
                                    dtype=torch.long)
                for attr in ("running_mean", "running_var", "weight", "bias"):
                    getattr(cbn, attr).copy_(getattr(fbn, attr)[keep])
        fitted[conv] = clip_weight_ranges(conv, clip_factors) if isinstance(conv, QConv2d) else 0
    return fitted
