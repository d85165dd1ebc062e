"""The packed deploy file: bit-exact round trip on real chips, measured size, rejected bad input."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from rsdet_compress.compress.baselines import two_stage, uniform_bits
from rsdet_compress.compress.calibration import calibration_set, image_batches
from rsdet_compress.compress.compressor import Workspace, compress
from rsdet_compress.compress.policy import Policy
from rsdet_compress.compress.quant import QConv2d, fake_quant_weight
from rsdet_compress.detectors.checkpoint import save_detector
from rsdet_compress.detectors.factory import create_detector
from rsdet_compress.errors import UserError
from rsdet_compress.export import packed as packed_mod
from rsdet_compress.export.packed import pack_codes, save_packed
from rsdet_compress.runtime.bnfold import fold, unit_var
from rsdet_compress.runtime.checkpoint import load_detector
from rsdet_compress.runtime.packed import load_packed, unpack_codes

torch.set_num_threads(1)
PREFIX_BYTES = 56  # docs/packed-format.md: magic 8, version 4, header_len 4, payload_len 8, sha256 32


def _mixed_policy(weights: Path) -> Policy:
    """30% pruned; per-channel bits cycling 2..8; the first layer float; one float channel in a 4-bit layer."""
    ws = Workspace.from_weights(weights)
    policy = ws.resolve(two_stage(ws.view, 0.3, 4, act_bits=8))
    names = [n for n in ws.view.quantizable if not any(n.startswith(s + ".") for s in policy.skipped)]
    cycle = itertools.cycle([2, 3, 4, 5, 6, 8])
    policy.layers[names[0]] = {"weight_bits": 32, "act_bits": 32}
    for i, name in enumerate(names[1:]):
        bits = [next(cycle) for _ in range(ws.view.kept(name, "out", policy))]
        if i == 3:
            bits[0] = 32  # a float channel inside a quantized conv
        policy.layers[name] = {"weight_bits": bits, "act_bits": 8}
    return policy


@pytest.fixture(scope="module")
def skynet_float(tmp_path_factory) -> Path:
    """An (untrained) SkyNet float checkpoint: bit-exactness does not need accuracy, only real inputs."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("skynet") / "float.pt"
    save_detector(create_detector("skynet", 2, names=["Airplane", "Truncated_airplane"]), path, {"imgsz": 320})
    return path


@pytest.fixture(scope="module")
def cases(trained_yolov8n: Path, skynet_float: Path, small_airbus: Path, tmp_path_factory) -> dict:
    """Per detector: float .pt, compressed .pt and packed file for the mixed policy (calibrated on real chips)."""
    out = tmp_path_factory.mktemp("packed")
    result = {}
    for name, weights in (("yolov8n", trained_yolov8n), ("skynet", skynet_float)):
        ckpt, packed = out / f"{name}-mixed.pt", out / f"{name}-mixed.rsdp"
        compress(weights, _mixed_policy(weights), ckpt, data=small_airbus, calib_images=16)
        result[name] = {"float": weights, "ckpt": ckpt, "packed": packed, "report": save_packed(ckpt, packed)}
    return result


@pytest.fixture(scope="module")
def chips(small_airbus: Path) -> torch.Tensor:
    """Eight real airbus validation chips, 0..1 floats."""
    return next(image_batches(calibration_set(str(small_airbus), 320, 8, split="val"), 8))


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _tensors(o)]


def _qweights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Effective (fake-quantized) weight of every conv that quantizes its weights."""
    return {f"{n}.weight": fake_quant_weight(m.weight, m.w_bits).detach() for n, m in model.named_modules()
            if isinstance(m, QConv2d) and m.quantizes_weight}


def _expected_payload(model: torch.nn.Module) -> int:
    """Payload bytes by the accounting of docs/packed-format.md, from the model alone (every BN folded)."""
    q = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, QConv2d)}
    total = 0
    for key, t in model.state_dict().items():
        if key.endswith(".w_bits") and key[:-len("w_bits")] + "weight" in q:
            continue
        if key.endswith((".running_mean", ".running_var", ".num_batches_tracked")):
            continue
        conv = q.get(key)
        if conv is not None and conv.quantizes_weight:
            n, bits = t[0].numel(), conv.w_bits.tolist()
            total += 5 * len(bits) + sum((n * b + 7) // 8 if b < 32 else 4 * n for b in bits)
        else:
            total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------ bit packing
def test_pack_codes_bit_order_is_little_endian_twos_complement():
    # 2-bit codes 1, -1, 0, -2 -> 01 11 00 10, LSB first: bits 1,0, 1,1, 0,0, 0,1 -> 0b10001101
    assert pack_codes(np.array([[1, -1, 0, -2]]), np.array([2])) == bytes([0x8D])
    # each channel starts on a byte; float channels take no bytes
    # (3-bit 3, -3, 1 -> 9 bits, 2 bytes; 2-bit -1, 1, 0 -> 1 byte)
    codes = np.array([[3, -3, 1], [0, 0, 0], [-1, 1, 0]])
    assert pack_codes(codes, np.array([3, 32, 2])) == bytes([0b01101011, 0, 0b00000111])


def test_pack_unpack_round_trip_every_width():
    rng = np.random.default_rng(0)
    bits = np.array([2, 3, 4, 5, 6, 7, 8, 12, 16, 32, 8, 2])
    n = 37  # n * bits not a multiple of 8: exercises the padding
    qmax = (1 << (np.minimum(bits, 16) - 1)) - 1
    codes = np.stack([rng.integers(-q, q + 1, n) for q in qmax]).astype(np.int32)
    codes[bits >= 32] = 0
    data = pack_codes(codes, bits)
    assert len(data) == sum((n * int(b) + 7) // 8 for b in bits if b < 32)
    np.testing.assert_array_equal(unpack_codes(data, bits, n), codes)


# ------------------------------------------------------------------ round trip
@pytest.mark.parametrize("name", ["yolov8n", "skynet"])
def test_round_trip_is_bit_exact_on_real_chips(cases, chips, name: str):
    case = cases[name]
    ref, ref_meta = load_detector(case["ckpt"])
    got, meta = load_packed(case["packed"])
    assert not got.training and meta["compressed"] and meta["packed"]
    assert {k: meta[k] for k in ("detector", "num_classes", "names")} == {k: ref_meta[k] for k in
                                                                         ("detector", "num_classes", "names")}
    # the policy really is mixed: pruned, 2..8-bit channels, a float layer, a float channel in a quantized conv
    bits = set(case["report"]["weights_by_bits"])
    assert {"2", "3", "4", "5", "6", "8", "32"} <= bits
    assert any(bool((m.w_bits >= 32).any()) and m.quantizes_weight for m in got.modules() if isinstance(m, QConv2d))
    assert case["report"]["fp32_bytes"] < 0.8 * os.path.getsize(case["float"])  # 30% pruned

    ref_state, got_state = ref.state_dict(), got.state_dict()
    assert ref_state.keys() == got_state.keys()
    ref_q, got_q = _qweights(ref), _qweights(got)
    assert ref_q.keys() == got_q.keys() and len(ref_q) > 5
    bns = {n for n, m in ref.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for key, t in ref_state.items():
        if key in ref_q:
            assert torch.equal(ref_q[key], got_q[key]), key  # the deployed (quantized) weight
        elif key.rpartition(".")[0] in bns:  # stored folded: same affine map, not the same four tensors
            continue
        else:
            assert t.dtype == got_state[key].dtype and torch.equal(t, got_state[key]), key
    modules = dict(got.named_modules())
    for name in bns:
        alpha, beta, _ = fold(dict(ref.named_modules())[name])
        assert torch.equal(modules[name].weight.detach(), alpha) and torch.equal(modules[name].bias.detach(), beta)
        assert not modules[name].running_mean.any()
    # the file stores codes, not the float weights: the raw weights differ, the deployed ones do not
    assert any(not torch.equal(ref_state[k], got_state[k]) for k in ref_q)

    with torch.no_grad():
        a, b = _tensors(ref(chips)), _tensors(got(chips))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a[0].abs().max() > 0


def test_file_follows_the_documented_layout(cases):
    """An independent reader written from docs/packed-format.md decodes a quantized conv channel by channel."""
    case = cases["yolov8n"]
    data = case["packed"].read_bytes()
    magic, version, hlen, plen, digest = struct.unpack_from("<8sIIQ32s", data)
    assert (magic, version) == (b"RSDPACK\x00", 2) and len(data) == PREFIX_BYTES + hlen + plen
    assert hashlib.sha256(data[PREFIX_BYTES:]).digest() == digest
    header = json.loads(zlib.decompress(data[PREFIX_BYTES:PREFIX_BYTES + hlen]))
    payload = data[PREFIX_BYTES + hlen:]
    assert header["format"] == "rsdet-compress/packed" and header["detector"] == "yolov8n"
    ref_q = _qweights(load_detector(case["ckpt"])[0])
    mixed = [e for e in header["tensors"] if e["dtype"] == "packed"
             and len(set(payload[e["offset"]:e["offset"] + e["shape"][0]])) > 2]
    entry = min(mixed, key=lambda e: np.prod(e["shape"]))  # the python bit loop below is slow
    o, n = entry["shape"][0], int(np.prod(entry["shape"][1:]))
    blob = payload[entry["offset"]:entry["offset"] + entry["nbytes"]]
    bits = list(blob[:o])
    scales = struct.unpack_from(f"<{o}f", blob, o)
    pos, floats = 5 * o, 5 * o + sum((n * b + 7) // 8 for b in bits if b < 32)
    rows = []
    for c, b in enumerate(bits):
        if b >= 32:
            rows.append(struct.unpack_from(f"<{n}f", blob, floats))
            floats += 4 * n
            continue
        stream = int.from_bytes(blob[pos:pos + (n * b + 7) // 8], "little")  # bit p of the stream = bit p here
        codes = [(stream >> (j * b)) & ((1 << b) - 1) for j in range(n)]
        codes = [v - (1 << b) if v >> (b - 1) else v for v in codes]
        rows.append((torch.tensor(codes, dtype=torch.float32) * torch.tensor(scales[c])).tolist())
        pos += (n * b + 7) // 8
    assert floats == entry["nbytes"]
    assert torch.equal(torch.tensor(rows, dtype=torch.float32).reshape(entry["shape"]), ref_q[entry["name"]])


# ------------------------------------------------------------------ size
def test_packed_is_much_smaller_and_matches_the_accounting(cases, trained_yolov8n: Path, tmp_path: Path):
    ws = Workspace.from_weights(trained_yolov8n)
    ckpt = tmp_path / "w4.pt"
    compress(trained_yolov8n, uniform_bits(ws.view, 4, act_bits=32), ckpt)
    report = save_packed(ckpt, tmp_path / "w4.rsdp")
    float_pt = os.path.getsize(trained_yolov8n)
    assert report["bytes"] == os.path.getsize(tmp_path / "w4.rsdp")
    # measured on the airbus baseline YOLOv8n: float .pt 12.19 MB -> 1.62 MB packed (7.5x; version 1: 1.71 MB)
    assert float_pt / report["bytes"] >= 6.5, (float_pt, report["bytes"])
    assert report["fp32_bytes"] / report["bytes"] >= 6.5
    assert set(report["weights_by_bits"]) == {"4", "32"}
    assert report["weights_by_bits"]["4"] > 50 * report["weights_by_bits"]["32"]  # only the protected head convs
    # mixed (30% pruned, 2..8 bits): far smaller still
    mixed = cases["yolov8n"]["report"]
    assert float_pt / mixed["bytes"] >= 9, (float_pt, mixed["bytes"])
    for rep, path in ((report, ckpt), (mixed, cases["yolov8n"]["ckpt"])):
        model = load_detector(path)[0]
        assert rep["payload_bytes"] == _expected_payload(model)
        assert rep["bytes"] == rep["header_bytes"] + rep["payload_bytes"]
        assert rep["header_bytes"] - PREFIX_BYTES < min(30_000, 0.02 * rep["bytes"])  # deflated policy + table
        assert rep["header_bytes"] < rep["header_json_bytes"] / 3
        convs = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert sum(rep["weights_by_bits"].values()) == convs


def test_batchnorm_stored_as_two_floats_bit_exactly(cases):
    """Every BN is folded to (alpha, beta); rebuilt with mean 0 and var r it gives the same outputs bit for bit."""
    for name, case in cases.items():
        model = load_detector(case["ckpt"])[0].eval()
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert case["report"]["bn_folded"] == len(bns) > 0, name
        x = torch.randn(3, bns[-1].num_features, 5, 5) * 3
        folded = fold(bns[-1], x)
        assert folded is not None
        alpha, beta, r = folded
        ref = bns[-1](x)
        got = torch.nn.functional.batch_norm(x, torch.zeros_like(alpha), torch.full_like(alpha, r), alpha, beta,
                                             False, 0.0, bns[-1].eps)
        assert torch.equal(ref, got) and not torch.equal(alpha, bns[-1].weight.detach())
    for eps in (1e-3, 1e-5, 1e-1):
        r = np.float32(unit_var(eps))
        assert np.float32(r + np.float32(eps)) == 1 and abs(float(r) - (1 - eps)) < 1e-6


def test_version_1_files_still_load(cases, chips, tmp_path: Path, monkeypatch):
    """Version 1 (plain JSON header, BN as four raw tensors) is what the version-2 writer makes without folding."""
    class PlainZlib:
        error = zlib.error

        @staticmethod
        def compress(data: bytes, level: int = -1) -> bytes:
            return data

    monkeypatch.setattr(packed_mod, "VERSION", 1)
    monkeypatch.setattr(packed_mod, "fold", lambda bn: None)
    monkeypatch.setattr(packed_mod, "zlib", PlainZlib)
    case = cases["skynet"]
    old = tmp_path / "v1.rsdp"
    report = save_packed(case["ckpt"], old)
    monkeypatch.undo()
    data = old.read_bytes()
    assert struct.unpack_from("<I", data, 8)[0] == 1 and data[PREFIX_BYTES:PREFIX_BYTES + 1] == b"{"
    assert report["bn_folded"] == 0 and report["bytes"] > case["report"]["bytes"]
    ref, got = load_detector(case["ckpt"])[0], load_packed(old)[0]
    with torch.no_grad():
        assert all(torch.equal(x, y) for x, y in zip(_tensors(ref(chips)), _tensors(got(chips))))


# ------------------------------------------------------------------ bad input
def test_float_checkpoint_rejected_and_nothing_written(trained_yolov8n: Path, tmp_path: Path):
    with pytest.raises(UserError, match="not a compressed checkpoint: apply a policy first"):
        save_packed(trained_yolov8n, tmp_path / "x.rsdp")
    assert list(tmp_path.iterdir()) == []


def _rewrite(data: bytes, header: dict) -> bytes:
    """A file with a modified header and a valid checksum (a consistent but wrong file)."""
    head = zlib.compress(json.dumps(header).encode())
    _, version, hlen, plen, _ = struct.unpack_from("<8sIIQ32s", data)
    payload = data[PREFIX_BYTES + hlen:]
    return (struct.pack("<8sIIQ32s", b"RSDPACK\x00", version, len(head), plen,
                        hashlib.sha256(head + payload).digest()) + head + payload)


def _plain(data: bytes, header: dict) -> bytes:
    """A version-2 file whose header was written as plain JSON (not deflated)."""
    head = json.dumps(header).encode()
    plen = struct.unpack_from("<Q", data, 16)[0]
    payload = data[len(data) - plen:]
    return (struct.pack("<8sIIQ32s", b"RSDPACK\x00", 2, len(head), plen, hashlib.sha256(head + payload).digest())
            + head + payload)


def test_bad_files_rejected_with_clear_messages(cases, tmp_path: Path):
    src = cases["skynet"]["packed"]
    data = src.read_bytes()
    hlen = struct.unpack_from("<I", data, 12)[0]
    header = json.loads(zlib.decompress(data[PREFIX_BYTES:PREFIX_BYTES + hlen]))
    flipped = bytearray(data)
    flipped[PREFIX_BYTES + hlen + (len(data) - PREFIX_BYTES - hlen) // 2] ^= 0x10
    bad_version = bytearray(data)
    bad_version[8:12] = struct.pack("<I", 3)
    cases_ = {
        "random.rsdp": (np.random.default_rng(0).bytes(4096), "not an rsdet-compress packed file"),
        "empty.rsdp": (b"", "not an rsdet-compress packed file"),
        "ckpt.rsdp": (cases["skynet"]["ckpt"].read_bytes(), "looks like a PyTorch checkpoint"),
        "truncated.rsdp": (data[:-100], "truncated packed file"),
        "prefix_only.rsdp": (data[:30], "truncated packed file"),
        "trailing.rsdp": (data + b"\0", "oversized packed file"),
        "flipped.rsdp": (bytes(flipped), "checksum mismatch: the packed file is corrupt"),
        "version.rsdp": (bytes(bad_version), "packed format version 3 not supported"),
        "plainjson.rsdp": (_plain(data, header), "header is not deflated JSON"),
        "bn.rsdp": (_rewrite(data, {**header, "bn_folded": {"model.nope": 0.999}}), "folded BatchNorm model.nope"),
        "detector.rsdp": (_rewrite(data, {**header, "detector": "nonet"}), "unknown detector 'nonet'"),
        "table.rsdp": (_rewrite(data, {**header, "tensors": header["tensors"][1:]}), "corrupt packed file"),
    }
    for name, (content, message) in cases_.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=message) as err:
            load_packed(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name)) and "\n" not in str(err.value), name
    with pytest.raises(UserError, match="packed file not found"):
        load_packed(tmp_path / "missing.rsdp")


def test_failed_write_leaves_no_temp_file_and_keeps_the_old_file(cases, tmp_path: Path, monkeypatch):
    out = tmp_path / "model.rsdp"
    out.write_bytes(b"old")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)  # the atomic writer renames with os.replace
    with pytest.raises(UserError, match="cannot write \\(No space left"):
        save_packed(cases["skynet"]["ckpt"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.rsdp"] and out.read_bytes() == b"old"
    monkeypatch.undo()
    report = save_packed(cases["skynet"]["ckpt"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.rsdp"] and report["bytes"] == out.stat().st_size
    assert out.read_bytes() == cases["skynet"]["packed"].read_bytes()  # deterministic
