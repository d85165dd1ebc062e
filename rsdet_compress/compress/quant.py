"""Fake quantization for mixed-precision policies: per-channel weight bits, per-layer activation bits.

A policy gives each conv layer one weight bit-width per (kept) output channel
and one bit-width for the layer's input activations. This module simulates
those integer formats in floating point ("fake quantization"): values are
rounded onto the integer grid and mapped straight back, so the model keeps
running in float, forward and backward, and can be fine-tuned (QAT) by the
ordinary ultralytics trainer.

* Weights: symmetric, per output channel, scale = max|w_c| / (2^(b-1) - 1).
  The range comes from the weights themselves on every call (no state), so it
  follows the weights during QAT and stays valid after BN folding (folding
  scales a channel's weights and its max|w| by the same factor: codes unchanged).
* Activations: asymmetric per tensor, range [lo, hi] calibrated by running
  min/max (:class:`ActQuantizer`, :func:`calibrate_activations`).
* 32 bits (anything >= 32) means "float": passed through bit-exactly.
* Gradients: straight-through estimators. The forward value is exactly the
  quantized value (``(x - x.detach()) + q`` adds an exact zero, unlike
  ``x + (q - x).detach()`` whose float rounding can move ``q`` by an ulp and
  would break the bit-exact match with :func:`quantized_weight`).

Note: the bit-width checks are data dependent (``(bits < 32).any()``); on a GPU
each costs one tiny host sync per layer and forward.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

#: bit-widths at or above this are "float": the tensor passes through untouched.
FLOAT_BITS = 32
#: largest integer width simulated (the float32 grid is exact far beyond the widths policies use).
MAX_INT_BITS = 16


def _check_bits(bits: int, what: str) -> int:
    bits = int(bits)
    if not (2 <= bits <= MAX_INT_BITS or bits >= FLOAT_BITS):
        raise ValueError(f"{what} bits must be in 2..{MAX_INT_BITS} or >= {FLOAT_BITS} (float), got {bits}")
    return bits


def _qmax(bits: Tensor, w: Tensor) -> Tensor:
    """Largest code of each output channel, 2^(b-1) - 1 (2 bits -> 1, 8 -> 127), shaped to broadcast over
    ``w`` (dim 0 = channels). Float channels get a finite stand-in: their result is discarded."""
    b = bits.to(w.device).clamp(max=MAX_INT_BITS).to(w.dtype)
    return (torch.pow(2.0, b - 1) - 1).view((-1,) + (1,) * (w.dim() - 1))


def _weight_qparams(w: Tensor, bits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Integer codes (as floats), per-channel scales and the float-channel mask for ``w``.

    Shared by :func:`fake_quant_weight` and :func:`quantized_weight` so both use the very
    same arithmetic (hence codes * scale reproduces the fake-quantized weight exactly).
    Float channels get code 0 and scale 0; an all-zero channel gets scale 0 (codes 0).
    """
    if bits.dim() != 1 or bits.numel() != w.shape[0]:
        raise ValueError(f"need one bit-width per output channel: bits {tuple(bits.shape)} for weight "
                         f"{tuple(w.shape)}")
    if w.dim() < 2:
        raise ValueError(f"weight must have an output-channel dim and at least one more, got {tuple(w.shape)}")
    bits = bits.to(w.device)
    is_float = bits >= FLOAT_BITS
    if bool(((bits < 2) | ((bits > MAX_INT_BITS) & ~is_float)).any()):
        raise ValueError(f"weight bits must be in 2..{MAX_INT_BITS} or >= {FLOAT_BITS}, got {bits.tolist()}")
    view = (-1,) + (1,) * (w.dim() - 1)
    qmax = _qmax(bits, w)
    wd = w.detach()
    scale = wd.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / qmax
    scale = torch.where(is_float.view(view), torch.zeros_like(scale), scale)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero / float channel: no 0/0
    codes = torch.clamp(torch.round(wd / safe), -qmax, qmax)
    codes = torch.where(is_float.view(view), torch.zeros_like(codes), codes)
    return codes, scale.view(-1), is_float


def fake_quant_weight(w: Tensor, bits: Tensor) -> Tensor:
    """Symmetric per-output-channel fake quantization of a weight (dim 0 = output channels).

    ``bits``: integer tensor, one width per output channel; channels with ``bits >= 32`` are
    returned unchanged (bit-exact). Straight-through: d(out)/d(w) is the identity (the scale is
    treated as a constant), so the result is differentiable for QAT.
    """
    codes, scale, is_float = _weight_qparams(w, bits)
    view = (-1,) + (1,) * (w.dim() - 1)
    q = torch.where(is_float.view(view), w.detach(), codes * scale.view(view))
    return (w - w.detach()) + q  # value: exactly q; gradient: identity


def lsq_fake_quant_weight(w: Tensor, bits: Tensor, step: Tensor) -> Tensor:
    """Per-output-channel fake quantization with learned step sizes (LSQ, Esser et al. 2020).

    ``step``: one step per output channel, a Parameter. Gradients reach both ``w``
    (straight-through inside the clip range, 0 outside) and ``step`` (LSQ's gradient, scaled by
    1 / sqrt(weights per channel x qmax) so steps move at the weights' pace). A step may shrink
    below max|w| / qmax (clipping: the MSE-optimal 4-bit range is ~0.7-0.9 of it) but is capped
    there: the channel's largest weight then always takes code +-qmax, so baking the result into
    the weights (:func:`bake_weight_steps`) gives back exactly this step on reload. Float
    channels pass through unchanged.
    """
    view = (-1,) + (1,) * (w.dim() - 1)
    is_float = (bits.to(w.device) >= FLOAT_BITS).view(view)
    qmax = _qmax(bits, w)
    top = w.detach().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    grad_scale = (w[0].numel() * qmax).rsqrt()
    s = step.view(view)
    s = s.detach() + (s - s.detach()) * grad_scale  # value exactly s, gradient scaled
    s = torch.minimum(s, top / qmax).clamp_min(torch.finfo(w.dtype).tiny)  # never a wider grid than max|w| needs
    v = torch.clamp(w / s, -qmax, qmax)
    q = (v.detach().round() + (v - v.detach())) * s  # value exactly round(v) * s (codes x scale), STE gradient
    return torch.where(is_float, w, q)


class ActQuantizer(nn.Module):
    """Asymmetric per-tensor fake quantization of activations with a calibrated range.

    * ``bits >= 32``: identity (no calibration needed).
    * ``calibrating = True``: records the running min/max of every input into the ``lo`` / ``hi``
      buffers and returns the input unchanged.
    * otherwise: quantizes to ``2^bits`` levels over [min(lo, 0), max(hi, 0)] with an integer
      zero point. The range is widened to include 0 (as torch's MinMaxObserver does) so that 0,
      hence the conv's zero padding and ReLU/SiLU zeros, is represented exactly.
    * never calibrated (``observed`` False): pass-through, with a one-time warning, so that a
      freshly built model still runs.

    Gradient: clipped straight-through estimator, identity for inputs inside the representable
    range and zero outside (what torch's fake_quantize does): clipped values do not react to
    the input, so passing gradient through them would be wrong.
    ``lo``, ``hi`` and ``observed`` are buffers and travel with ``state_dict()``.
    """

    def __init__(self, bits: int = FLOAT_BITS) -> None:
        super().__init__()
        self.bits = _check_bits(bits, "activation")
        self.calibrating = False
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when this quantizer actually quantizes (bits < 32)."""
        return self.bits < FLOAT_BITS

    def reset(self) -> None:
        """Forget the calibrated range."""
        self.lo.zero_()
        self.hi.zero_()
        self.observed.fill_(False)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold ``x``'s min/max into the running range (no host sync)."""
        xmin = x.detach().amin().to(self.lo.dtype)
        xmax = x.detach().amax().to(self.hi.dtype)
        self.lo.copy_(torch.where(self.observed, torch.minimum(self.lo, xmin), xmin))
        self.hi.copy_(torch.where(self.observed, torch.maximum(self.hi, xmax), xmax))
        self.observed.fill_(True)

    def qparams(self) -> tuple[Tensor, Tensor]:
        """(scale, zero_point) of the current range; both 0-dim float tensors, zero_point integral."""
        levels = 2 ** self.bits - 1
        lo = torch.clamp(self.lo, max=0.0)
        hi = torch.clamp(self.hi, min=0.0)
        scale = torch.clamp((hi - lo) / levels, min=torch.finfo(torch.float32).tiny)  # all-zero range
        zero_point = torch.clamp(torch.round(-lo / scale), 0, levels)
        return scale, zero_point

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self.observe(x)
            return x
        if not self.enabled:
            return x
        if not bool(self.observed):
            if not self._warned:
                warnings.warn("ActQuantizer used before calibration: passing activations through "
                              "unquantized (run calibrate_activations first)", stacklevel=2)
                self._warned = True
            return x
        levels = 2 ** self.bits - 1
        scale, zp = self.qparams()
        scale = scale.to(x.dtype).clamp(min=torch.finfo(x.dtype).tiny)  # fp16/bf16 inputs under AMP
        zp = zp.to(x.dtype)
        xd = x.detach()
        q = (torch.clamp(torch.round(xd / scale) + zp, 0, levels) - zp) * scale
        inside = (xd >= -zp * scale) & (xd <= (levels - zp) * scale)
        return (x - xd) * inside + q  # value: exactly q; gradient: 1 inside the range, 0 outside

    def extra_repr(self) -> str:
        if not self.enabled:
            return f"bits={self.bits} (off)"
        if not bool(self.observed):
            return f"bits={self.bits}, uncalibrated"
        return f"bits={self.bits}, range=[{float(self.lo):.4g}, {float(self.hi):.4g}]"


def _bits_tensor(weight_bits: Sequence[int] | int | Tensor, out_channels: int, device) -> Tensor:
    if isinstance(weight_bits, Tensor):
        weight_bits = weight_bits.tolist()
    if isinstance(weight_bits, int):
        weight_bits = [weight_bits] * out_channels
    values = [_check_bits(b, "weight") for b in weight_bits]
    if len(values) != out_channels:
        raise ValueError(f"{len(values)} weight bit-widths for {out_channels} output channels")
    return torch.tensor(values, dtype=torch.int16, device=device)


class QConv2d(nn.Conv2d):
    """``nn.Conv2d`` with per-output-channel fake-quantized weights and a fake-quantized input.

    Still an ``nn.Conv2d`` (ultralytics, torch-pruning and BN folding treat it as one). Buffers:
    ``w_bits`` (int16, one width per output channel; 32 = float) and the ``act_quant`` range.
    The weight range is recomputed from the weights on every forward.
    """

    def __init__(self, *args, weight_bits: Sequence[int] | int = FLOAT_BITS, act_bits: int = FLOAT_BITS,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("w_bits", _bits_tensor(weight_bits, self.out_channels, self.weight.device))
        self.act_quant = ActQuantizer(act_bits)
        #: learned per-channel weight steps while QAT learns them (:func:`learn_weight_steps`), else None;
        #: baked into the weights before saving, so checkpoints never carry it
        self.register_parameter("weight_step", None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weight_bits: Sequence[int] | int = FLOAT_BITS,
                  act_bits: int = FLOAT_BITS) -> QConv2d:
        """A QConv2d with ``conv``'s hyper-parameters that shares its weight/bias Parameters (no copy)."""
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode,
                device="meta", dtype=conv.weight.dtype,  # no allocation: Parameters are replaced below
                weight_bits=FLOAT_BITS, act_bits=act_bits)
        q.weight = conv.weight
        q.bias = conv.bias
        q.w_bits = _bits_tensor(weight_bits, conv.out_channels, conv.weight.device)
        q.act_quant = ActQuantizer(act_bits).to(conv.weight.device)
        q.train(conv.training)
        return q

    @property
    def quantizes_weight(self) -> bool:
        """True when at least one output channel has fewer than 32 bits."""
        return bool((self.w_bits < FLOAT_BITS).any())

    def forward(self, x: Tensor) -> Tensor:
        x = self.act_quant(x)
        if self.weight_step is not None:
            w = lsq_fake_quant_weight(self.weight, self.w_bits, self.weight_step)
        else:
            w = fake_quant_weight(self.weight, self.w_bits) if self.quantizes_weight else self.weight
        return self._conv_forward(x, w, self.bias)

    def extra_repr(self) -> str:
        b = self.w_bits.float()
        lo, hi = int(b.min()), int(b.max())
        wb = f"{lo}" if lo == hi else f"mean {float(b.mean()):.3g} [{lo}..{hi}]"
        n_float = int((self.w_bits >= FLOAT_BITS).sum())
        if 0 < n_float < b.numel():
            wb += f" ({n_float} float)"
        return f"{super().extra_repr()}, w_bits={wb}, a_bits={self.act_quant.bits}"


def quantized_weight(conv: QConv2d) -> tuple[Tensor, Tensor]:
    """Integer weight codes and per-channel scales of ``conv``, for bit-packed export.

    Returns ``(codes, scales)``: ``codes`` int32 with the weight's shape, in
    [-(2^(b-1)-1), 2^(b-1)-1] for a b-bit channel; ``scales`` float [out_channels].
    ``codes * scales[:, None, None, None]`` equals :func:`fake_quant_weight` exactly on the
    quantized channels. Float (>= 32 bit) channels get codes 0 and scale 0: export them from
    ``conv.weight`` directly.
    """
    with torch.no_grad():
        codes, scale, _ = _weight_qparams(conv.weight, conv.w_bits)
    return codes.to(torch.int32), scale


@torch.no_grad()
def clip_weight_ranges(conv: QConv2d, factors: Sequence[float]) -> int:
    """Clip each quantized output channel's weights to the fraction of max|w| with the least rounding error.

    The weight grid is max|w_c| / qmax wide: one outlier weight coarsens it for the whole
    channel, and at 4 bits clipping it (~0.7-0.9 max, the MSE choice of OpenVINO/AIMET weight
    range setting) costs less than the resolution it buys. The clip is baked into the weights
    (``w`` clamped to +-f_c max|w_c|), so the grid, export and the checkpoint format stay as
    they are: the clamped weights' own max gives exactly the clipped scale. Returns how many
    channels were clipped.
    """
    if not conv.quantizes_weight:
        return 0
    w = conv.weight.detach().flatten(1)
    bits = conv.w_bits.to(w.device)
    quantized = bits < FLOAT_BITS
    qmax = _qmax(bits, w)
    top = w.abs().amax(1, keepdim=True)
    best = torch.ones_like(top)
    best_err = torch.full_like(top, float("inf"))
    for f in factors:
        scale = torch.where(top > 0, f * top / qmax, torch.ones_like(top))
        err = ((torch.clamp(torch.round(w / scale), -qmax, qmax) * scale - w) ** 2).sum(1, keepdim=True)
        better = err < best_err
        best = torch.where(better, torch.full_like(best, f), best)
        best_err = torch.where(better, err, best_err)
    clip = (best * top).squeeze(1)
    clipped = quantized & (best.squeeze(1) < 1.0)
    if bool(clipped.any()):
        view = (-1,) + (1,) * (conv.weight.dim() - 1)
        limit = torch.where(clipped, clip, torch.full_like(clip, float("inf"))).view(view)
        conv.weight.copy_(torch.maximum(torch.minimum(conv.weight, limit), -limit))
    return int(clipped.sum())


def learn_weight_steps(model: nn.Module) -> list[nn.Parameter]:
    """Give every weight-quantizing QConv2d a learnable step per output channel (LSQ) for QAT.

    Steps start at the grid the weights have now (max|w| / qmax, after any ``recover`` clip),
    so the model's output does not move when they are attached. Returns the new Parameters.
    """
    steps = []
    for m in model.modules():
        if isinstance(m, QConv2d) and m.quantizes_weight and m.weight_step is None:
            _, scale, is_float = _weight_qparams(m.weight.detach(), m.w_bits)
            m.weight_step = nn.Parameter(torch.where(is_float, torch.ones_like(scale), scale))
            steps.append(m.weight_step)
    return steps


@torch.no_grad()
def bake_weight_steps(model: nn.Module) -> int:
    """Write each learned step into its conv's weights (the fake-quantized values) and drop the steps.

    Afterwards the plain per-channel max|w| grid reproduces the learned grid, so the
    checkpoint, ``quantized_weight`` and every export read it as usual. Returns how many convs.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, QConv2d) and m.weight_step is not None:
            m.weight.copy_(lsq_fake_quant_weight(m.weight, m.w_bits, m.weight_step))
            m.weight_step = None
            n += 1
    return n


def iter_act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    """All ActQuantizers in ``model`` (module order)."""
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def set_calibrating(model: nn.Module, flag: bool) -> int:
    """Switch range recording on/off for every ActQuantizer in ``model``; returns how many there are."""
    quantizers = iter_act_quantizers(model)
    for q in quantizers:
        q.calibrating = flag
    return len(quantizers)


def calibrate_activations(model: nn.Module, batches: Iterable[Tensor], reset: bool = True) -> None:
    """Record activation ranges: run ``model`` in eval mode, without grad, over ``batches``.

    Every ActQuantizer records the min/max of its input over all batches (``reset``: forget
    earlier ranges first). Batches are moved to the model's device. The train/eval mode of every
    submodule is restored afterwards, and calibration is switched off even on error.
    """
    quantizers = iter_act_quantizers(model)
    if reset:
        for q in quantizers:
            q.reset()
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    set_calibrating(model, True)
    try:
        model.eval()
        with torch.no_grad():
            for x in batches:
                model(x.to(device) if device is not None else x)
    finally:
        set_calibrating(model, False)
        for m, training in modes.items():
            m.training = training
