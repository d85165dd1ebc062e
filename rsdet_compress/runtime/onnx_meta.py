"""The metadata that marks an ONNX file as ours: one JSON object under the ``rsdet_compress`` key.

:mod:`rsdet_compress.export.onnx` writes it (detector, class names, imgsz,
stride, rescale, policy summary); :func:`read_meta` reads it back, and
:func:`rsdet_compress.runtime.loader.load_model` loads only files that have it.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

#: metadata_props key holding our JSON metadata; its presence marks the file as ours.
META_KEY = "rsdet_compress"
#: value of the metadata's ``format`` field.
FORMAT = "rsdet-compress/onnx"
VERSION = 1


def read_meta(model: onnx.ModelProto) -> dict | None:
    """Our metadata of an ONNX model, or None if it is not ours."""
    for p in model.metadata_props:
        if p.key == META_KEY:
            try:
                data = json.loads(p.value)
            except json.JSONDecodeError:
                return None
            return data if isinstance(data, dict) and data.get("format") == FORMAT else None
    return None
