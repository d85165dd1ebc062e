"""One split's images, decoded and letterboxed once, for repeated evaluation.

A compression search evaluates hundreds of candidate models on the same
validation split. Decoding JPEGs and resizing them for every candidate would
cost more than the forward passes on small detectors, so :class:`EvalSet`
does it once and keeps a single uint8 tensor (N x 3 x imgsz x imgsz) plus what
is needed to map predictions back to the original pixels.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO

from rsdet_compress.data.imageio import read_image
from rsdet_compress.data.letterbox import RatioPad, letterbox
from rsdet_compress.errors import UserError


def load_coco(coco_json: Path) -> COCO:
    """Load a COCO ground-truth file with pycocotools, quietly; bad files raise UserError."""
    coco_json = Path(coco_json)
    try:
        dataset = json.loads(coco_json.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{coco_json}: cannot read COCO JSON ({exc})") from exc
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise UserError(f"{coco_json}: missing list field {key!r}")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@dataclass
class EvalSet:
    """Decoded, letterboxed images of one split plus their COCO ground truth.

    Attributes:
        coco: the ground truth (``pycocotools.coco.COCO``).
        images: uint8 tensor N x 3 x imgsz x imgsz, RGB, letterboxed.
        image_ids: COCO image id of each row of ``images``.
        shapes: original (h, w) of each image.
        ratio_pad: ``((gain_h, gain_w), (pad_left, pad_top))`` of each image.
        imgsz: side of the square model input.
        class_names: category names ordered by category id (class index i <-> ``category_ids[i]``).
        category_ids: the sorted category ids.
    """

    coco: COCO
    images: torch.Tensor
    image_ids: list[int]
    shapes: list[tuple[int, int]]
    ratio_pad: list[RatioPad]
    imgsz: int
    class_names: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_ids)

    @classmethod
    def from_coco(cls, coco_json: Path, image_dir: Path, imgsz: int,
                  max_images: int | None = None, scale_up: bool = True,
                  image_ids: list[int] | None = None) -> EvalSet:
        """Decode and letterbox the images listed in ``coco_json`` (paths relative to ``image_dir``).

        Images are taken in increasing id order; ``image_ids`` restricts them to
        a subset and ``max_images`` keeps the first ones (a quick proxy split for
        a search). ``scale_up=False`` never enlarges images smaller than
        ``imgsz`` (they are only padded).
        """
        if imgsz <= 0:
            raise ValueError(f"imgsz must be positive, got {imgsz}")
        coco = load_coco(Path(coco_json))
        image_dir = Path(image_dir)
        ids = sorted(coco.getImgIds())
        if image_ids is not None:
            wanted = set(int(i) for i in image_ids)
            ids = [i for i in ids if i in wanted]
        if max_images is not None:
            ids = ids[:max(0, max_images)]
        images = torch.empty((len(ids), 3, imgsz, imgsz), dtype=torch.uint8)
        shapes: list[tuple[int, int]] = []
        ratio_pad: list[RatioPad] = []
        for row, image_id in enumerate(ids):
            path = image_dir / coco.imgs[image_id]["file_name"]
            bgr = read_image(path)  # the decoder chips were cut with; CorruptImage names the file
            shapes.append((int(bgr.shape[0]), int(bgr.shape[1])))
            boxed, rp = letterbox(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), imgsz, scale_up)
            images[row] = torch.from_numpy(np.ascontiguousarray(boxed.transpose(2, 0, 1)))
            ratio_pad.append(rp)
        cat_ids = sorted(coco.getCatIds())
        names = [str(coco.cats[c]["name"]) for c in cat_ids]
        return cls(coco=coco, images=images, image_ids=ids, shapes=shapes, ratio_pad=ratio_pad,
                   imgsz=imgsz, class_names=names, category_ids=cat_ids)
