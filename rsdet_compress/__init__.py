"""rsdet-compress: compress remote-sensing object detectors (pruning + mixed precision).

Public API (the CLI ``rsdet-compress`` is a thin layer over these)::

    from rsdet_compress import create_detector, list_detectors, prepare, train, evaluate, predict, recover, profile
"""
from __future__ import annotations

import os

# ultralytics must never reach for the network (fonts, asset downloads, hub checks). Python runs this
# package's __init__ before any of its submodules, so setting it here once covers every entry point
# (CLI, library use, tests) before ultralytics is first imported; a value the user set is kept.
os.environ.setdefault("YOLO_OFFLINE", "1")
# ultralytics' import writes OMP_NUM_THREADS=1 when it is unset (one thread per data-loader worker), and
# every process started after it (a resumed search, a Ray worker) would then run torch on one thread.
# Setting it first to OpenMP's own default (the CPUs this process may use) keeps torch's choice.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))

__version__ = "0.1.0"

from rsdet_compress.errors import UserError  # noqa: E402

__all__ = ["UserError", "create_detector", "list_detectors", "prepare", "train", "evaluate", "predict",
           "load_detector", "recover", "profile", "__version__"]


def __getattr__(name: str):
    """Import heavy submodules (torch, ultralytics) only when their API is used."""
    if name == "create_detector":
        from rsdet_compress.detectors.factory import create_detector
        return create_detector
    if name == "list_detectors":
        from rsdet_compress.detectors.registry import list_detectors
        return list_detectors
    if name == "load_detector":
        from rsdet_compress.runtime.checkpoint import load_detector
        return load_detector
    if name == "prepare":
        from rsdet_compress.data.prepare import prepare
        return prepare
    if name == "train":
        from rsdet_compress.engine.trainer import train
        return train
    if name == "evaluate":
        from rsdet_compress.engine.scorer import evaluate
        return evaluate
    if name == "recover":
        from rsdet_compress.engine.recovery import recover
        return recover
    if name == "profile":
        from rsdet_compress.runtime.profile import profile
        return profile
    if name == "predict":
        from rsdet_compress.engine.predictor import predict
        return predict
    raise AttributeError(name)
