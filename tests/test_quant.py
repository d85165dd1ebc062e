"""Fake quantization: per-channel weight bits, calibrated activation bits, QConv2d, export codes."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from rsdet_compress.compress.quant import (
    ActQuantizer,
    QConv2d,
    bake_weight_steps,
    calibrate_activations,
    clip_weight_ranges,
    fake_quant_weight,
    learn_weight_steps,
    quantized_weight,
    set_calibrating,
)

torch.set_num_threads(1)  # a long CPU benchmark shares this machine


def _bits(*b: int) -> torch.Tensor:
    return torch.tensor(b, dtype=torch.int16)


def _features(n: int = 2, c: int = 16, hw: int = 16, seed: int = 0) -> torch.Tensor:
    """Realistic conv input: SiLU-ed random features (mostly positive, small negative tail)."""
    g = torch.Generator().manual_seed(seed)
    return nn.functional.silu(torch.randn(n, c, hw, hw, generator=g) * 1.5)


def _conv(cin: int = 16, cout: int = 24, k: int = 3, groups: int = 1, bias: bool = True, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- fake_quant_weight

def test_8bit_error_within_half_step_and_few_levels():
    w = torch.randn(24, 16, 3, 3)
    q = fake_quant_weight(w, torch.full((24,), 8, dtype=torch.int16))
    scale = w.abs().amax(dim=(1, 2, 3)) / 127
    err = (q - w).abs().amax(dim=(1, 2, 3))
    assert torch.all(err <= scale / 2 * (1 + 1e-5))
    assert torch.all(err > 0)  # really quantized
    for c in range(24):
        assert q[c].unique().numel() <= 2 ** 8 - 1
    # the channel's extreme value is on the grid: max |q| == max |w|
    torch.testing.assert_close(q.abs().amax(dim=(1, 2, 3)), w.abs().amax(dim=(1, 2, 3)))


def test_2bit_is_ternary():
    w = torch.randn(8, 4, 3, 3)
    q = fake_quant_weight(w, torch.full((8,), 2, dtype=torch.int16))
    for c in range(8):
        s = w[c].abs().max()
        values = set(q[c].unique().tolist())
        assert len(values) <= 3
        assert values <= {-float(s), 0.0, float(s)}


def test_32bit_channels_bit_identical_and_zero_channel_stays_zero():
    w = torch.randn(4, 3, 3, 3)
    w[2] = 0.0
    q = fake_quant_weight(w, _bits(32, 4, 4, 32))
    assert torch.equal(q[0], w[0]) and torch.equal(q[3], w[3])
    assert torch.equal(q[2], torch.zeros_like(w[2]))
    assert torch.isfinite(q).all()
    assert torch.equal(fake_quant_weight(w, _bits(32, 32, 32, 32)), w)


def test_mixed_bits_honoured_per_channel():
    w = torch.randn(4, 8, 3, 3)
    bits = _bits(2, 4, 8, 32)
    q = fake_quant_weight(w, bits)
    for c, b in enumerate([2, 4, 8]):
        assert q[c].unique().numel() <= 2 ** b - 1
        alone = fake_quant_weight(w[c:c + 1], _bits(b))  # same result as quantizing the channel alone
        assert torch.equal(q[c:c + 1], alone)
    assert torch.equal(q[3], w[3])
    # changing channel 0 (also its range) changes nothing elsewhere
    w2 = w.clone()
    w2[0] *= 7.0
    q2 = fake_quant_weight(w2, bits)
    assert not torch.equal(q2[0], q[0])
    assert torch.equal(q2[1:], q[1:])


def test_error_decreases_with_bits():
    w = torch.randn(16, 8, 3, 3)
    errs = [_rel_err(fake_quant_weight(w, torch.full((16,), b, dtype=torch.int16)), w) for b in (2, 3, 4, 5, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_ste_gradient_is_identity():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    fake_quant_weight(w, _bits(2, 4, 8, 32)).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_bad_bits_rejected():
    w = torch.randn(2, 3, 1, 1)
    with pytest.raises(ValueError):
        fake_quant_weight(w, _bits(4))  # wrong length
    with pytest.raises(ValueError):
        fake_quant_weight(w, _bits(1, 4))  # 1 bit: no symmetric grid
    with pytest.raises(ValueError):
        QConv2d.from_conv(nn.Conv2d(3, 2, 1), [4, 20])


# ---------------------------------------------------------------- quantized_weight

def test_quantized_weight_codes_reproduce_fake_quant_exactly():
    conv = _conv(8, 6)
    with torch.no_grad():
        conv.weight[4] = 0.0
    bits = [2, 3, 4, 8, 5, 32]
    qc = QConv2d.from_conv(conv, bits)
    codes, scales = quantized_weight(qc)
    assert codes.dtype == torch.int32 and codes.shape == conv.weight.shape and scales.shape == (6,)
    fq = fake_quant_weight(conv.weight, qc.w_bits)
    recon = codes * scales[:, None, None, None]
    for c, b in enumerate(bits):
        if b < 32:
            assert torch.equal(recon[c], fq[c]), c
            lim = 2 ** (b - 1) - 1
            assert codes[c].abs().max() <= lim
        else:
            assert scales[c] == 0 and torch.all(codes[c] == 0)
    assert codes[0].abs().max() == 1 and codes[3].abs().max() == 127  # the extreme uses the full range


def test_clip_weight_ranges_lowers_rounding_error_and_keeps_float_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 4, 3, bias=False)
    with torch.no_grad():
        conv.weight.normal_()
        conv.weight[0, 0, 0, 0] = 12.0  # one outlier: at max|w| every other weight of channel 0 lands on 0
        conv.weight[2, 0, 0, 0] = 12.0  # same outlier in a float channel: must stay
    qc = QConv2d.from_conv(conv, [4, 4, 32, 8])
    w0 = conv.weight.detach().clone()
    err_before = ((fake_quant_weight(w0, qc.w_bits) - w0) ** 2).flatten(1).sum(1)
    clipped = clip_weight_ranges(qc, (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3))
    # the stored (clamped) weights fake-quantize onto the clipped grid, judged against the original weights
    err_after = ((fake_quant_weight(qc.weight, qc.w_bits) - w0) ** 2).flatten(1).sum(1)
    assert clipped >= 1
    assert err_after[0] < 0.8 * err_before[0]  # the outlier channel gains most
    assert torch.all(err_after[[0, 1, 3]] <= err_before[[0, 1, 3]] + 1e-6)
    assert torch.equal(qc.weight[2], w0[2])  # float channel untouched
    assert qc.weight[0].abs().max() < 12.0
    codes, scales = quantized_weight(qc)  # export still reproduces the fake quantization exactly
    assert torch.equal(codes[:2] * scales[:2, None, None, None], fake_quant_weight(qc.weight, qc.w_bits)[:2])
    assert clip_weight_ranges(qc, (1.0,)) == 0  # factor 1 only: nothing moves


def test_learned_weight_steps_start_on_the_grid_learn_a_clip_and_bake_into_plain_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.normal_()  # gaussian tails: at 3-4 bits the output error is least below max|w| (a clip)
    qc = QConv2d.from_conv(conv, [4, 3, 32, 4])
    model = nn.Sequential(qc)
    keys = set(model.state_dict())
    x = torch.randn(8, 8, 12, 12)
    target = nn.functional.conv2d(x, conv.weight.detach(), conv.bias.detach(), padding=1)  # the float conv
    before = model(x).detach()
    steps = learn_weight_steps(model)
    assert len(steps) == 1 and torch.equal(model(x), before)  # attaching moves nothing
    w0, s0 = qc.weight.detach().clone(), steps[0].detach().clone()
    opt = torch.optim.Adam(steps, lr=1e-2)  # steps only: what they learn is the grid, not the weights
    for _ in range(60):
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
    assert torch.equal(qc.weight, w0) and steps[0].grad[[0, 1, 3]].abs().sum() > 0
    assert torch.all(steps[0][[0, 1, 3]] < 0.97 * s0[[0, 1, 3]])  # every quantized channel learned to clip
    learned = model(x).detach()
    assert ((learned - target) ** 2).mean() < ((before - target) ** 2).mean()
    assert bake_weight_steps(model) == 1 and qc.weight_step is None and set(model.state_dict()) == keys
    assert torch.allclose(model(x), learned, atol=1e-5)  # the plain max|w| grid gives back the learned one
    codes, scales = quantized_weight(qc)
    assert torch.allclose(scales[[0, 1, 3]], steps[0][[0, 1, 3]].detach())
    assert [int(codes[c].abs().max()) for c in (0, 1, 3)] == [7, 3, 7]
    assert torch.equal(qc.weight[2], w0[2])  # float channel untouched


# ---------------------------------------------------------------- ActQuantizer

def test_act_quantizer_calibrates_range_and_quantizes():
    aq = ActQuantizer(4)
    aq.calibrating = True
    x1 = torch.rand(1000) * 2.0 - 0.3  # [-0.3, 1.7]
    x2 = torch.cat([torch.rand(1000) * 5.0, torch.tensor([-0.3, 5.0])])
    assert torch.equal(aq(x1), x1)  # pass-through while calibrating
    aq(x2)
    aq.calibrating = False
    assert float(aq.lo) == pytest.approx(-0.3) and float(aq.hi) == pytest.approx(5.0)
    x = torch.linspace(-1.0, 6.0, 5000)
    q = aq(x)
    assert q.unique().numel() <= 2 ** 4
    inside = (x > -0.3) & (x < 5.0)
    step = 5.3 / 15
    assert (q - x)[inside].abs().max() <= step / 2 + 1e-5
    assert q.min() >= -0.3 - step and q.max() <= 5.0 + step  # outside values are clipped
    assert float(aq(torch.zeros(3)).abs().max()) == 0.0  # zero exactly representable


def test_act_quantizer_ste_gradient_clipped():
    aq = ActQuantizer(8)
    aq.calibrating = True
    aq(torch.tensor([0.0, 1.0]))
    aq.calibrating = False
    x = torch.tensor([-0.5, 0.25, 0.5, 2.0], requires_grad=True)
    aq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_act_quantizer_off_and_uncalibrated_pass_through():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(ActQuantizer(32)(x), x)
    with pytest.warns(UserWarning, match="before calibration"):
        assert torch.equal(ActQuantizer(8)(x), x)
    with pytest.raises(ValueError):
        ActQuantizer(1)


def test_act_quantizer_state_dict_round_trip():
    aq = ActQuantizer(6)
    set_calibrating(aq, True)
    aq(torch.tensor([-1.0, 3.0]))
    set_calibrating(aq, False)
    fresh = ActQuantizer(6)
    fresh.load_state_dict(aq.state_dict())
    assert float(fresh.lo) == -1.0 and float(fresh.hi) == 3.0 and bool(fresh.observed)
    x = torch.randn(100)
    assert torch.equal(fresh(x), aq(x))


# ---------------------------------------------------------------- QConv2d

def test_qconv_float_bits_is_identical_and_shares_parameters():
    conv = _conv()
    qc = QConv2d.from_conv(conv, 32, 32)
    assert isinstance(qc, nn.Conv2d)
    assert qc.weight is conv.weight and qc.bias is conv.bias
    assert qc.w_bits.dtype == torch.int16 and qc.w_bits.shape == (24,)
    assert "w_bits" in qc.state_dict() and "act_quant.lo" in qc.state_dict()
    x = _features()
    assert torch.equal(qc(x), conv(x))


def test_qconv_copies_hyper_parameters():
    conv = nn.Conv2d(8, 12, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=4, bias=False,
                     padding_mode="reflect")
    qc = QConv2d.from_conv(conv, 8)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "_reversed_padding_repeated_twice"):
        assert getattr(qc, attr) == getattr(conv, attr), attr
    assert qc.bias is None
    x = torch.randn(1, 8, 11, 13)
    assert qc(x).shape == conv(x).shape


def test_qconv_error_small_at_8_bits_and_grows_as_bits_drop():
    conv = _conv()
    calib = [_features(seed=s) for s in range(3)]
    x = _features(seed=10)
    ref = conv(x).detach()
    errs = {}
    for b in (8, 4, 2):
        qc = QConv2d.from_conv(conv, b, b)
        calibrate_activations(qc, calib)
        errs[b] = _rel_err(qc(x).detach(), ref)
    assert errs[8] < 0.02, errs
    assert errs[2] > errs[4] > errs[8] and errs[2] > 10 * errs[8], errs


def test_qconv_mixed_bits_backward_and_repr():
    conv = _conv()
    bits = [2, 3, 4, 5, 6, 8, 32, 8] * 3
    qc = QConv2d.from_conv(conv, bits, act_bits=8)
    calibrate_activations(qc, [_features()])
    x = _features(seed=1).requires_grad_()
    qc(x).square().mean().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    assert conv.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    r = repr(qc)
    assert "w_bits=mean" in r and "[2..32]" in r and "(3 float)" in r and "a_bits=8" in r


def test_qconv_depthwise():
    conv = _conv(16, 16, groups=16)
    qc = QConv2d.from_conv(conv, [4, 8] * 8, act_bits=8)
    calibrate_activations(qc, [_features()])
    x = _features(seed=3)
    out = qc(x)
    assert out.shape == conv(x).shape
    assert _rel_err(out.detach(), conv(x).detach()) < 0.1


def test_qconv_deepcopy_pickle_and_state_dict_round_trip():
    conv = _conv()
    qc = QConv2d.from_conv(conv, [2, 4, 8, 32] * 6, act_bits=6)
    calibrate_activations(qc, [_features()])
    x = _features(seed=5)
    out = qc(x)

    dup = copy.deepcopy(qc)
    assert dup.weight is not qc.weight and torch.equal(dup(x), out)
    assert torch.equal(pickle.loads(pickle.dumps(qc))(x), out)

    buf = io.BytesIO()
    torch.save(qc.state_dict(), buf)
    buf.seek(0)
    fresh = QConv2d.from_conv(_conv(seed=1), 32, act_bits=6)  # other weights, float bits, uncalibrated
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh.w_bits, qc.w_bits)
    assert float(fresh.act_quant.lo) == float(qc.act_quant.lo) and float(fresh.act_quant.hi) == float(qc.act_quant.hi)
    assert torch.equal(fresh(x), out)


# ---------------------------------------------------------------- calibrate_activations

def test_calibrate_activations_sets_all_ranges_and_restores_mode():
    model = nn.Sequential(QConv2d.from_conv(_conv(16, 8), 8, 8), nn.SiLU(),
                          QConv2d.from_conv(_conv(8, 4, seed=1), 4, 6))
    model.train()
    model[1].eval()  # a mixed mode must be restored as it was
    batches = [_features(seed=s) for s in range(2)]
    calibrate_activations(model, iter(batches))
    assert model.training and model[0].training and not model[1].training
    for m in (model[0], model[2]):
        assert bool(m.act_quant.observed) and not m.act_quant.calibrating
        assert float(m.act_quant.lo) < 0 < float(m.act_quant.hi)  # SiLU outputs / conv outputs
    assert float(model[0].act_quant.lo) == pytest.approx(float(torch.stack(batches).min()))
    assert float(model[0].act_quant.hi) == pytest.approx(float(torch.stack(batches).max()))
    out = model(batches[0])
    assert out.shape == (2, 4, 16, 16)
    with pytest.raises(RuntimeError):  # calibration is switched off even when a batch fails
        calibrate_activations(model, [torch.randn(1, 3, 8, 8)])
    assert set_calibrating(model, False) == 2 and not model[0].act_quant.calibrating
