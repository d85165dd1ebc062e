"""Bbox-aware albumentations for overhead imagery, run inside ultralytics' data pipeline.

Seen from above, a scene has no "up": flips both ways and 90-degree turns
are label-preserving, unlike for street-level photos. Ground sampling
distance varies little within a sensor, so scale jitter stays moderate; sun,
haze and sensor differences call for colour jitter.
"""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network

import albumentations as A  # noqa: E402

#: ultralytics hyper-parameters our pipeline replaces (left on, they would double the same change).
REPLACED_HYP = {"fliplr": 0.0, "flipud": 0.0, "degrees": 0.0, "scale": 0.0,
                "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}


def overhead_augmentations(scale: float = 0.25, colour: float = 0.5) -> list:
    """Flips, 90-degree rotations (the square's 8 symmetries), scale +-``scale``, colour jitter."""
    return [
        A.SquareSymmetry(p=1.0),  # uniform over the dihedral group D4: flips x/y and rot90s
        A.Affine(scale=(1.0 - scale, 1.0 + scale), keep_ratio=True, p=0.5),
        A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.3, hue=0.02, p=colour),
        A.GaussNoise(std_range=(0.01, 0.04), p=0.1),  # sensor noise
    ]
