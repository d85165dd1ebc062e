"""BatchNorm as two floats per channel, bit-exact: the packed file stores a BN's effective affine map.

An eval-mode BatchNorm computes ``y = x * alpha + beta`` per channel, where
``alpha = weight / sqrt(running_var + eps)`` and ``beta = bias - running_mean * alpha``
are formed once inside PyTorch's kernel. Storing ``(alpha, beta)`` instead of the
four tensors halves the BN's share of the deploy file (the cost model's "folded
BN: two fp32 values per channel"). To stay bit-exact we do not recompute
``alpha``/``beta`` in Python (rounding and fused multiply-adds may differ from the
kernel): we read them out of the kernel itself with probe inputs, then rebuild a
BN with ``weight = alpha``, ``bias = beta``, ``running_mean = 0`` and a
``running_var`` ``r`` with ``fl(r + eps) == 1``, so the kernel's own
``alpha' = weight / sqrt(1)`` and ``beta' = bias - 0 * alpha'`` are the same
numbers. The rebuilt BN is checked to give identical ``alpha``/``beta`` and
identical outputs on a probe; where it does not, the BN is stored unfolded.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def unit_var(eps: float) -> float:
    """The binary32 ``r`` closest to ``1 - eps`` with ``fl32(r + fl32(eps)) == 1`` (so the BN's std is 1)."""
    e = np.float32(eps)
    r = np.float32(1) - e
    for _ in range(64):
        s = np.float32(r + e)
        if s == np.float32(1):
            return float(r)
        r = np.nextafter(r, np.float32(-np.inf) if s > 1 else np.float32(np.inf), dtype=np.float32)
    raise ValueError(f"no running_var gives unit std for eps={eps}")


@torch.no_grad()
def _affine(eps: float, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
            var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's (alpha, beta) for these BN parameters: outputs at x = 1 with zero bias/mean, and at x = 0."""
    c = weight.numel()
    ones, zeros = torch.ones(1, c, 2, 2), torch.zeros(1, c, 2, 2)
    alpha = nn.functional.batch_norm(ones, torch.zeros(c), var, weight, torch.zeros(c), False, 0.0, eps)
    beta = nn.functional.batch_norm(zeros, mean, var, weight, bias, False, 0.0, eps)
    return alpha[0, :, 0, 0].clone(), beta[0, :, 0, 0].clone()


def foldable(bn: nn.Module) -> bool:
    """Only affine 2-D BatchNorms with running statistics are stored folded."""
    return (type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats
            and bn.running_mean is not None and bn.weight.dtype == torch.float32)


@torch.no_grad()
def fold(bn: nn.BatchNorm2d, probe: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(alpha, beta, r)`` that rebuild ``bn`` bit-exactly in eval mode, or ``None`` if they would not.

    ``probe`` (shape ``[N, C, H, W]``, default a seeded random tensor) is compared
    through both BNs as a last check.
    """
    if not foldable(bn):
        return None
    w, b = bn.weight.detach().cpu(), bn.bias.detach().cpu()
    mean, var = bn.running_mean.cpu(), bn.running_var.cpu()
    alpha, beta = _affine(bn.eps, w, b, mean, var)
    r = unit_var(bn.eps)
    c = w.numel()
    rvar = torch.full((c,), r)
    if not all(torch.equal(x, y) for x, y in zip(_affine(bn.eps, alpha, beta, torch.zeros(c), rvar), (alpha, beta))):
        return None
    if probe is None:
        probe = torch.randn(2, c, 3, 3, generator=torch.Generator().manual_seed(0)) * 4
    ref = nn.functional.batch_norm(probe, mean, var, w, b, False, 0.0, bn.eps)
    got = nn.functional.batch_norm(probe, torch.zeros(c), rvar, alpha, beta, False, 0.0, bn.eps)
    return (alpha, beta, r) if torch.equal(ref, got) else None


def folded_state(alpha: torch.Tensor, beta: torch.Tensor, r: float) -> dict[str, torch.Tensor]:
    """The BN state_dict entries (without prefix) that :func:`fold`'s numbers stand for."""
    c = alpha.numel()
    return {"weight": alpha, "bias": beta, "running_mean": torch.zeros(c), "running_var": torch.full((c,), r),
            "num_batches_tracked": torch.tensor(0, dtype=torch.long)}
