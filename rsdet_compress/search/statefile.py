"""Search checkpoints (``state.pt``) that load without unpickling objects.

``--resume`` reads a file from disk, and a ``.pt`` is a pickle: a full
unpickle of a crafted one runs its code. So the state is reduced to what
``torch.load(weights_only=True)`` accepts (tensors, numbers, strings, bytes,
lists, tuples, dicts): numpy arrays and scalars, which the agents' replay
buffers and RNG bookkeeping hold, become tagged dicts of their raw bytes and
dtype, and are rebuilt bit for bit on load, so a resume stays exact.
Anything else is refused when saving, never silently pickled.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsdet_compress.atomic import atomic_path
from rsdet_compress.errors import UserError

_ARRAY, _SCALAR = "__ndarray__", "__npscalar__"
_PLAIN = (type(None), bool, int, float, str, bytes, torch.Tensor)


def encode(obj: Any) -> Any:
    """``obj`` with numpy values replaced by tagged plain dicts; TypeError for anything not plain data."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("object arrays cannot be saved in a search checkpoint")
        return {_ARRAY: np.ascontiguousarray(obj).tobytes(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):  # np.float64 and float differ in numpy's type promotion: keep the type
        return {_SCALAR: np.asarray(obj).tobytes(), "dtype": obj.dtype.str}
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [encode(v) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    raise TypeError(f"{type(obj).__name__} cannot be saved in a search checkpoint (plain data only)")


def decode(obj: Any) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(obj, dict):
        if _ARRAY in obj:
            return np.frombuffer(obj[_ARRAY], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        if _SCALAR in obj:
            return np.frombuffer(obj[_SCALAR], dtype=np.dtype(obj["dtype"]))[0]
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(decode(v) for v in obj)
    return obj


def save_state(path: str | Path, state: dict) -> Path:
    """Write ``state`` atomically: a kill -9 leaves the previous checkpoint, never half of this one."""
    data = encode(state)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return Path(path)


def load_state(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_state`; one-line UserError for anything else."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = next((ln for ln in str(e).splitlines() if "GLOBAL" in ln), "holds pickled objects")
        raise UserError(f"{path}: refused: not a search checkpoint of plain data ({first.strip()[:120]})") from None
    except Exception as e:  # truncated, not a torch file...
        raise UserError(f"{path}: not a readable search checkpoint ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a search checkpoint")
    return decode(data)
