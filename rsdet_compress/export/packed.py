"""Writing the packed deploy file: every weight at its searched bit-width, bit-packed, in one checksummed file.

A compressed checkpoint (``rsdet-compress compress``) stores fp32 weights plus
the policy; fake quantization re-derives the integer codes on every forward.
The packed file stores what a deployment needs instead: per quantized conv the
integer codes at each output channel's bit-width (two's complement, bit-packed
LSB first), the fp32 per-channel scales, each BatchNorm as its two-float affine
map (:mod:`rsdet_compress.runtime.bnfold`, bit-exact), and everything else (biases,
float layers and channels, activation ranges) as raw fp32 -- never fp16, which
would break the bit-exact reload. A small deflated JSON header carries the
detector name, classes, policy and tensor table, so
:func:`rsdet_compress.runtime.packed.load_packed` (the reader, with the format
constants) rebuilds the pruned, fake-quantized model the way
:func:`~rsdet_compress.runtime.checkpoint.load_detector` does and its outputs
equal the checkpoint's bit for bit.
The byte layout (for a C reader) is specified in ``docs/packed-format.md``.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rsdet_compress.atomic import write_bytes
from rsdet_compress.compress.quant import FLOAT_BITS, ActQuantizer, QConv2d, quantized_weight
from rsdet_compress.detectors.arch import arch_of
from rsdet_compress.errors import UserError
from rsdet_compress.runtime.bnfold import fold
from rsdet_compress.runtime.checkpoint import load_detector
from rsdet_compress.runtime.packed import DTYPES, FORMAT, MAGIC, NUMPY_DTYPES, PREFIX, VERSION, quantized_convs

#: torch dtype -> raw tensor dtype name in the tensor table
_CODE = {v: k for k, v in DTYPES.items()}


# ------------------------------------------------------------------ bit packing
def pack_codes(codes: np.ndarray, bits: np.ndarray) -> bytes:
    """Channel-major bit stream of integer ``codes`` [O, n] at ``bits[c]`` bits per code of channel c.

    Each code is written as ``bits[c]``-bit two's complement, least significant bit first; each
    channel starts on a byte boundary (its last byte is zero-padded); float channels
    (bits >= 32) take no bytes.
    """
    rows: list[bytes] = [b""] * codes.shape[0]
    for b in sorted(set(int(x) for x in bits if x < FLOAT_BITS)):
        idx = np.flatnonzero(bits == b)
        u = codes[idx].astype(np.int64) & ((1 << b) - 1)
        planes = ((u[..., None] >> np.arange(b)) & 1).astype(np.uint8).reshape(len(idx), -1)
        packed = np.packbits(planes, axis=1, bitorder="little")
        for row, c in zip(packed, idx):
            rows[c] = row.tobytes()
    return b"".join(rows)


# ------------------------------------------------------------------ encoding
def _encode_conv(conv: QConv2d) -> tuple[bytes, np.ndarray]:
    """One packed entry's bytes (bits, scales, codes, float rows) and its per-channel bits."""
    bits = np.minimum(conv.w_bits.cpu().numpy().astype(np.int64), FLOAT_BITS)
    codes, scales = quantized_weight(conv)
    out_channels = conv.weight.shape[0]
    w = conv.weight.detach().float().cpu().reshape(out_channels, -1)
    return (bits.astype(np.uint8).tobytes() + scales.float().cpu().numpy().astype("<f4").tobytes()
            + pack_codes(codes.cpu().reshape(out_channels, -1).numpy(), bits)
            + w[torch.from_numpy(bits >= FLOAT_BITS)].numpy().astype("<f4").tobytes()), bits


def _raw(t: torch.Tensor, what: str) -> tuple[str, bytes]:
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        t = t.float()  # checkpoints are fp32 already; anything else is widened, never narrowed
    if t.dtype not in _CODE:
        raise ValueError(f"{what}: tensor dtype {t.dtype} has no packed encoding")
    code = _CODE[t.dtype]
    return code, t.numpy().astype(NUMPY_DTYPES[code]).tobytes()


def _fold_bns(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, float], set[str]]:
    """Folded BN tensors to store instead (``name -> tensor``), ``{bn: running_var}`` and names to leave out."""
    replace: dict[str, torch.Tensor] = {}
    folded: dict[str, float] = {}
    drop = {k for k in model.state_dict() if k.endswith(".num_batches_tracked")}  # training-only counter
    for name, m in model.named_modules():
        f = fold(m) if isinstance(m, nn.BatchNorm2d) else None
        if f is None:
            continue
        alpha, beta, folded[name] = f
        replace.update({f"{name}.weight": alpha, f"{name}.bias": beta})
        drop.update({f"{name}.running_mean", f"{name}.running_var"})
    return replace, folded, drop


def _encode(model: nn.Module) -> tuple[list[dict], bytes, dict, dict[str, float]]:
    """Tensor table, payload, bit-width counts and folded BNs for a compressed model's state."""
    qconvs = quantized_convs(model)
    packed = {f"{n}.weight": m for n, m in qconvs.items() if m.quantizes_weight}
    replace, folded, skip = _fold_bns(model)
    skip |= {f"{n}.w_bits" for n in qconvs}  # rebuilt from the policy (packed convs: checked against bits)
    table: list[dict] = []
    chunks: list[bytes] = []
    offset = 0
    weights_by_bits: dict[int, int] = {}
    channels_by_bits: dict[int, int] = {}
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        if name in packed:
            blob, bits = _encode_conv(packed[name])
            entry = {"name": name, "dtype": "packed", "shape": list(t.shape)}
            n = t[0].numel()
            for b in bits.tolist():
                weights_by_bits[b] = weights_by_bits.get(b, 0) + n
                channels_by_bits[b] = channels_by_bits.get(b, 0) + 1
        else:
            code, blob = _raw(replace.get(name, t), name)
            entry = {"name": name, "dtype": code, "shape": list(t.shape)}
        entry.update(offset=offset, nbytes=len(blob))
        table.append(entry)
        chunks.append(blob)
        offset += len(blob)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and f"{name}.weight" not in packed:
            n = m.weight.numel()
            weights_by_bits[FLOAT_BITS] = weights_by_bits.get(FLOAT_BITS, 0) + n
            channels_by_bits[FLOAT_BITS] = channels_by_bits.get(FLOAT_BITS, 0) + m.weight.shape[0]
    counts = {"weights_by_bits": {str(k): v for k, v in sorted(weights_by_bits.items())},
              "channels_by_bits": {str(k): v for k, v in sorted(channels_by_bits.items())}}
    return table, b"".join(chunks), counts, folded


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of the same pruned architecture's float tensors at fp32 (activation ranges excluded)."""
    act = {n for n, m in model.named_modules() if isinstance(m, ActQuantizer)}
    return 4 * sum(t.numel() for k, t in model.state_dict().items()
                   if t.is_floating_point() and k.rpartition(".")[0] not in act)


def save_packed(weights: str | Path, out: str | Path) -> dict:
    """Write the packed deploy file ``out`` for the compressed checkpoint ``weights``; returns a size report.

    Written atomically (temp file in the same folder, then rename): a failure never leaves a
    file at ``out`` that looks complete, nor a temp file behind.
    """
    model, meta = load_detector(weights)
    if not meta.get("compressed"):
        raise UserError(f"{weights}: not a compressed checkpoint: apply a policy first (rsdet-compress compress)")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give the packed file's path")
    table, payload, counts, folded = _encode(model)
    header = {"format": FORMAT, "version": VERSION, "detector": meta["detector"], "arch": arch_of(model),
              "num_classes": int(meta["num_classes"]), "names": meta.get("names"),
              "imgsz": int(model.policy.imgsz), "policy": model.policy.to_dict(),
              "meta": {k: v for k, v in meta.items() if k not in ("detector", "num_classes", "names", "compressed")},
              "bn_folded": folded, "tensors": table}
    text = json.dumps(header, separators=(",", ":"), default=str).encode("utf-8")
    head = zlib.compress(text, 9)
    digest = hashlib.sha256(head + payload).digest()
    prefix = PREFIX.pack(MAGIC, VERSION, len(head), len(payload), digest)
    write_bytes(out, prefix + head + payload)
    size = out.stat().st_size
    fp32 = fp32_bytes(model)
    return {"path": str(out), "bytes": size, "fp32_bytes": fp32, "ratio": fp32 / size,
            "header_bytes": PREFIX.size + len(head), "header_json_bytes": len(text), "payload_bytes": len(payload),
            "bn_folded": len(folded), **counts}
