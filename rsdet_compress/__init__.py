"""rsdet-compress: compress remote-sensing object detectors (pruning + mixed precision).

Public API (the CLI ``rsdet-compress`` is a thin layer over these)::

    from rsdet_compress import create_detector, list_detectors, prepare, train, evaluate, predict
"""
from __future__ import annotations

__version__ = "0.1.0"

from rsdet_compress.errors import UserError  # noqa: E402

__all__ = ["UserError", "create_detector", "list_detectors", "prepare", "train", "evaluate", "predict",
           "load_detector", "__version__"]


def __getattr__(name: str):
    """Import heavy submodules (torch, ultralytics) only when their API is used."""
    if name in ("create_detector", "list_detectors", "load_detector"):
        from rsdet_compress.detectors import registry
        return getattr(registry, name)
    if name == "prepare":
        from rsdet_compress.data.prepare import prepare
        return prepare
    if name == "train":
        from rsdet_compress.engine.trainer import train
        return train
    if name == "evaluate":
        from rsdet_compress.engine.scorer import evaluate
        return evaluate
    if name == "predict":
        from rsdet_compress.engine.predictor import predict
        return predict
    raise AttributeError(name)
