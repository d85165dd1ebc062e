"""Deterministic, seeded train/val/test split by source image (no image in two splits)."""
from __future__ import annotations

import random

SPLITS = ("train", "val", "test")


def split_sources(source_ids: list[str], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> dict[str, str]:
    """Map each source id to "train", "val" or "test".

    Splitting by source image (not by tile) keeps overlapping tiles of one
    scene out of two splits, which would otherwise leak into the held-out mAP.
    Every split with a non-zero fraction gets at least one image when there
    are enough images; the result depends only on the set of ids and the seed.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    ids = sorted(set(source_ids))
    random.Random(seed).shuffle(ids)
    n = len(ids)
    n_val = round(n * fractions[1])
    n_test = round(n * fractions[2])
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_val, n_test = min(n_val, n), min(n_test, max(0, n - n_val))
    out = {}
    for k, sid in enumerate(ids):
        out[sid] = "val" if k < n_val else "test" if k < n_val + n_test else "train"
    return out
