"""Command line: ``rsdet-compress`` (main.py) and its sub-command modules.

Each command imports its implementation inside the function that runs it, on
purpose: the implementations pull in torch, ultralytics, onnxruntime and mlflow
(about 10 s on two cores), which ``--help``, ``models`` and usage errors should
not wait for (importing ``rsdet_compress.cli.main`` takes 0.2 s).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable


def comma_list(kind: Callable[[str], object], name: str) -> Callable[[str], tuple]:
    """argparse type: 'a,b,c' -> a tuple of ``kind`` values, or a clean usage error naming ``name``."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {name}, got {text!r}") from None
    return parse


def add_trust_weights(p: argparse.ArgumentParser) -> None:
    """``--trust-weights`` on a command that loads weights (see ``detectors.checkpoint.trusted_weights``)."""
    p.add_argument("--trust-weights", action="store_true",
                   help="fully unpickle weights files the restricted loader refuses; such a file can run code "
                        "when loaded, so only for files you made or trust")


def trust_scope(args: argparse.Namespace):
    """The context a command runs in: ``trusted_weights()`` (announced on stderr) when ``--trust-weights`` is given."""
    import contextlib
    import sys
    if not getattr(args, "trust_weights", False):
        return contextlib.nullcontext()
    from rsdet_compress.detectors.checkpoint import trusted_weights  # torch + ultralytics: only when asked for
    print("warning: --trust-weights: weights files are fully unpickled; a crafted file runs its code on load",
          file=sys.stderr)
    return trusted_weights()
