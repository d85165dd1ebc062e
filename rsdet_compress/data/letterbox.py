"""Letterboxing: an image resized keeping its aspect ratio and padded to a square model input.

The same pixels a model trained with ultralytics sees, plus the ``ratio_pad``
that maps predicted boxes back to the original image.
"""
from __future__ import annotations

import cv2
import numpy as np
from ultralytics.data.augment import LetterBox

PAD_VALUE = 114  # ultralytics' letterbox grey

RatioPad = tuple[tuple[float, float], tuple[int, int]]  # ((gain_h, gain_w), (pad_left, pad_top))


def letterbox(image: np.ndarray, imgsz: int, scale_up: bool = True) -> tuple[np.ndarray, RatioPad]:
    """Resize ``image`` (H x W x 3) keeping its aspect ratio and pad it to ``imgsz`` x ``imgsz``.

    ultralytics' ``LetterBox`` does the work (same pixels a model trained with
    ultralytics sees); shrinking uses ``INTER_AREA`` like its validation loader.
    Returns the padded image and ``ratio_pad = ((gain_h, gain_w), (pad_left, pad_top))``
    for ``ultralytics.utils.ops.scale_boxes``; the gains are the exact per-axis
    factors of the rounded resize, so boxes map back without drift.
    """
    h, w = image.shape[:2]
    shrink = min(imgsz / h, imgsz / w) < 1
    lb = LetterBox(new_shape=(imgsz, imgsz), auto=False, scaleup=scale_up, padding_value=PAD_VALUE,
                   interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    params = lb.get_params({"img": image})
    out = lb.apply_image({"img": image}, params)["img"]
    new_w, new_h = params["new_unpad"]
    return out, ((new_h / h, new_w / w), (params["left"], params["top"]))
