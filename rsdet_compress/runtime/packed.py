"""Reading the packed deploy file: format constants, validation and the bit-exact model rebuild.

The packed file (written by :mod:`rsdet_compress.export.packed`) stores per
quantized conv the integer codes at each output channel's bit-width (two's
complement, bit-packed LSB first), the fp32 per-channel scales, each BatchNorm
as its two-float affine map (:mod:`rsdet_compress.runtime.bnfold`), and
everything else as raw fp32, behind a small deflated JSON header (detector,
classes, policy, tensor table). :func:`load_packed` rebuilds the pruned,
fake-quantized model the way
:func:`~rsdet_compress.runtime.checkpoint.load_detector` does for the
compressed checkpoint, and its outputs equal the checkpoint's bit for bit.
The byte layout (for a C reader) is specified in ``docs/packed-format.md``.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rsdet_compress.compress.quant import FLOAT_BITS, MAX_INT_BITS, QConv2d, fake_quant_weight
from rsdet_compress.detectors.registry import DETECTORS, build_detector
from rsdet_compress.errors import UserError
from rsdet_compress.runtime.bnfold import folded_state
from rsdet_compress.runtime.checkpoint import rebuild_compressed

FORMAT = "rsdet-compress/packed"
#: 2: zlib-deflated header, BatchNorms folded to two floats, no num_batches_tracked (1: plain JSON, raw BN)
VERSION = 2
READABLE = (1, 2)
MAGIC = b"RSDPACK\x00"
#: fixed prefix: magic, format version, JSON header length, payload length, sha256(header + payload)
PREFIX = struct.Struct("<8sIIQ32s")
#: raw tensor dtypes: table name <-> torch dtype (all little-endian; bool is one byte 0/1)
DTYPES = {"f32": torch.float32, "i64": torch.int64, "i32": torch.int32, "i16": torch.int16,
          "u8": torch.uint8, "bool": torch.bool}
#: numpy dtype of each raw tensor dtype
NUMPY_DTYPES = {"f32": "<f4", "i64": "<i8", "i32": "<i4", "i16": "<i2", "u8": "u1", "bool": "u1"}


# ------------------------------------------------------------------ bit packing
def unpack_codes(data: bytes, bits: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`rsdet_compress.export.packed.pack_codes`: int32 codes [O, n] (0 for float channels)."""
    sizes = np.array([code_bytes(n, int(b)) for b in bits], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    buf = np.frombuffer(data, dtype=np.uint8)
    codes = np.zeros((len(bits), n), dtype=np.int32)
    for b in sorted(set(int(x) for x in bits if x < FLOAT_BITS)):
        idx = np.flatnonzero(bits == b)
        rows = np.stack([buf[s:s + sizes[c]] for s, c in zip(starts[idx], idx)])
        planes = np.unpackbits(rows, axis=1, count=n * b, bitorder="little").reshape(len(idx), n, b)
        u = (planes.astype(np.int64) << np.arange(b)).sum(axis=2)
        codes[idx] = (u - ((u >> (b - 1)) << b)).astype(np.int32)  # sign-extend
    return codes


def code_bytes(n: int, bits: int) -> int:
    """Bytes of one channel's ``n`` codes at ``bits`` bits (float channels: none; stored as floats)."""
    return 0 if bits >= FLOAT_BITS else (n * bits + 7) // 8


def packed_entry_bytes(out_channels: int, n: int, bits: list[int]) -> int:
    """Payload bytes of one packed conv: bits u8[O], scales f32[O], codes, float channels f32[n] each."""
    floats = sum(b >= FLOAT_BITS for b in bits)
    return out_channels * 5 + sum(code_bytes(n, b) for b in bits) + 4 * n * floats


def quantized_convs(model: nn.Module) -> dict[str, QConv2d]:
    """``{name: QConv2d}`` of a compressed model: the convs whose weights a packed file bit-packs."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QConv2d)}


# ------------------------------------------------------------------ decoding
def _read(path: Path) -> tuple[dict, bytes]:
    """Validated (header, payload) of a packed file; UserError for anything not a sound version-1 file."""
    if not path.is_file():
        raise UserError(f"{path}: packed file not found")
    data = path.read_bytes()
    if data[:len(MAGIC)] != MAGIC[:len(data)] or not data:
        hint = " (looks like a PyTorch checkpoint: use load_detector)" if data[:2] == b"PK" else ""
        raise UserError(f"{path}: not an rsdet-compress packed file (bad magic){hint}")
    if len(data) < PREFIX.size:
        raise UserError(f"{path}: truncated packed file ({len(data)} bytes, less than its {PREFIX.size}-byte prefix)")
    _, version, hlen, plen, digest = PREFIX.unpack_from(data)
    if version not in READABLE:
        raise UserError(f"{path}: packed format version {version} not supported "
                        f"(this rsdet-compress reads {', '.join(map(str, READABLE))})")
    expected = PREFIX.size + hlen + plen
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "oversized"
        raise UserError(f"{path}: {what} packed file ({len(data)} bytes, its prefix says {expected})")
    body = memoryview(data)[PREFIX.size:]
    if hashlib.sha256(body).digest() != digest:
        raise UserError(f"{path}: checksum mismatch: the packed file is corrupt")
    try:
        head = bytes(body[:hlen])
        header = json.loads((zlib.decompress(head) if version >= 2 else head).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError):
        what = "deflated JSON" if version >= 2 else "JSON"
        raise UserError(f"{path}: corrupt packed file (header is not {what})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt packed file (header is not a JSON object)")
    missing = [k for k in ("format", "detector", "num_classes", "policy", "tensors") if k not in header]
    if header.get("format", FORMAT) != FORMAT or missing:
        raise UserError(f"{path}: corrupt packed file (header field(s) {', '.join(missing) or 'format'} wrong)")
    return header, bytes(body[hlen:])


def _decode_conv(entry: dict, blob: bytes, path: Path) -> tuple[torch.Tensor, np.ndarray]:
    """Weight tensor whose fake quantization gives exactly the stored codes * scales, and its bits."""
    shape = entry["shape"]
    out_channels, n = shape[0], int(np.prod(shape[1:]))
    bits = np.frombuffer(blob, dtype=np.uint8, count=out_channels).astype(np.int64)
    if len(blob) != packed_entry_bytes(out_channels, n, bits.tolist()) or not np.all(
            ((bits >= 2) & (bits <= MAX_INT_BITS)) | (bits == FLOAT_BITS)):
        raise UserError(f"{path}: corrupt packed file (tensor {entry['name']} has inconsistent bits or size)")
    scales = torch.from_numpy(np.frombuffer(blob, "<f4", out_channels, out_channels).astype(np.float32))
    start = out_channels * 5
    code_len = sum(code_bytes(n, int(b)) for b in bits)
    codes = torch.from_numpy(unpack_codes(blob[start:start + code_len], bits, n)).float()
    floats = torch.from_numpy(np.frombuffer(blob, "<f4", offset=start + code_len).astype(np.float32))
    is_float = torch.from_numpy(bits >= FLOAT_BITS)
    # code * scale in fp32 is the deployed weight and exactly what fake_quant_weight computes. Loaded as
    # the conv's weight, fake quantization gives it back unchanged: max|w_c| = fl(qmax * s) and
    # fl(fl(qmax * s) / qmax) == s for every scale that is itself a quotient fl(m / qmax) (checked
    # exhaustively over a binade for every qmax = 2^(b-1) - 1, b = 2..16). Verified below anyway.
    w = codes * scales[:, None]
    w[is_float] = floats.reshape(-1, n)
    w = w.reshape(shape)
    if not torch.equal(fake_quant_weight(w, torch.from_numpy(bits).to(torch.int16)), w):
        raise UserError(f"{path}: tensor {entry['name']}: stored codes and scales cannot be reproduced exactly")
    return w, bits


def _unfold_bns(model: nn.Module, folded: dict, state: dict[str, torch.Tensor], path: Path) -> None:
    """Complete ``state`` with the BN tensors a version-2 file leaves out (see :mod:`.bnfold`)."""
    modules = dict(model.named_modules())
    for name, r in folded.items():
        if not isinstance(modules.get(name), nn.BatchNorm2d) or f"{name}.weight" not in state:
            raise UserError(f"{path}: corrupt packed file (folded BatchNorm {name} not in the model)")
        full = folded_state(state[f"{name}.weight"], state[f"{name}.bias"], float(r))
        state.update({f"{name}.{k}": full[k] for k in ("running_mean", "running_var")})
    for name, m in modules.items():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            state.setdefault(f"{name}.num_batches_tracked", torch.tensor(0, dtype=torch.long))


def load_packed(path: str | Path) -> tuple[nn.Module, dict]:
    """Load a packed file -> (model in eval mode, metadata), like ``load_detector`` on its checkpoint.

    The model is the pruned, fake-quantized detector rebuilt from the stored policy; its outputs
    equal those of the compressed checkpoint it was packed from, bit for bit.
    """
    path = Path(path)
    header, payload = _read(path)
    arch = header.get("arch")
    if header["detector"] not in DETECTORS and not isinstance(arch, dict):
        raise UserError(f"{path}: unknown detector {header['detector']!r} in packed file")
    model = build_detector(str(header["detector"]), int(header["num_classes"]), names=header.get("names"),
                           arch=arch if isinstance(arch, dict) else None)
    model = rebuild_compressed(model, header["policy"], path)
    qbits = {f"{n}.weight": m.w_bits for n, m in quantized_convs(model).items()}
    state: dict[str, torch.Tensor] = {}
    end = 0
    try:
        for entry in header["tensors"]:
            name, offset, nbytes = entry["name"], int(entry["offset"]), int(entry["nbytes"])
            if offset != end or offset + nbytes > len(payload):
                raise UserError(f"{path}: corrupt packed file (tensor {name} lies outside the payload)")
            blob, end = payload[offset:offset + nbytes], offset + nbytes
            if entry["dtype"] == "packed":
                w, bits = _decode_conv(entry, blob, path)
                rebuilt = qbits.get(name)
                if rebuilt is None or not np.array_equal(np.minimum(rebuilt.numpy(), FLOAT_BITS), bits):
                    raise UserError(f"{path}: tensor {name}: stored bit-widths do not match the policy")
                state[name] = w
            else:
                code = entry["dtype"]
                count = int(np.prod(entry["shape"], dtype=np.int64))
                if nbytes != count * np.dtype(NUMPY_DTYPES[code]).itemsize:
                    raise UserError(f"{path}: corrupt packed file (tensor {name}: {nbytes} bytes for its shape)")
                arr = np.frombuffer(blob, NUMPY_DTYPES[code], count).reshape(entry["shape"])
                state[name] = torch.from_numpy(arr.copy()).to(DTYPES[code])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: corrupt packed file (tensor table: {type(e).__name__}: {str(e)[:80]})") from None
    if end != len(payload):
        raise UserError(f"{path}: corrupt packed file ({len(payload) - end} payload bytes not in the tensor table)")
    _unfold_bns(model, header.get("bn_folded") or {}, state, path)
    packed = {e["name"] for e in header["tensors"] if e["dtype"] == "packed"}
    for name, m in quantized_convs(model).items():
        if m.quantizes_weight and f"{name}.weight" not in packed:
            raise UserError(f"{path}: quantized layer {name} has no packed weights")
        state[f"{name}.w_bits"] = m.w_bits
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit detector {header['detector']!r} "
                        f"({str(e).splitlines()[0][:100]})") from None
    meta = {**header.get("meta", {}), "detector": header["detector"], "num_classes": header["num_classes"],
            "names": header.get("names"), "compressed": True, "packed": True}
    return model.eval(), meta
