"""Sliced (SAHI-style) inference: scenes far larger than the detector's input, in bounded memory.

A scene is cut into overlapping windows (edge windows shifted inward, never
padded with junk). Each window is read on its own (rasterio windows; only a
small image is decoded at once), resized by the model's training ``rescale``
so objects have the size the detector learnt, batched through the detector and
mapped back to scene pixels. Only one batch of chips is ever in memory.

Merging across windows, as SAHI does it and a little more:

1. a box cut by an *interior* window border is dropped when a box from another
   window (complete there) covers most of it: the neighbour saw the whole object;
2. the remaining cut pieces of one object (objects wider than the overlap) are
   joined into their union (SAHI's greedy NMM with intersection-over-smaller);
3. duplicates from the overlaps go by class-wise NMS, or by weighted box fusion
   (coordinates averaged by score) with ``merge="wbf"``.

An optional full-image pass at reduced resolution (``full_pass``) adds objects
larger than a window, as SAHI's "standard prediction" does.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou
from tqdm import tqdm
from ultralytics.utils.nms import non_max_suppression

from rsdet_compress.data.letterbox import PAD_VALUE, letterbox
from rsdet_compress.data.tiling import Tile, check_tile_count, tile_grid
from rsdet_compress.engine.scene import SceneReader
from rsdet_compress.errors import UserError

#: a box within this many model-input pixels of an interior window border counts as cut by it.
CUT_MARGIN = 2.0
MERGE_METHODS = ("nms", "wbf")

RatioPad = tuple[tuple[float, float], tuple[float, float]]  # ((gain_y, gain_x), (pad_left, pad_top))


def tile_windows(width: int, height: int, slice_size: int, overlap: float, rescale: float = 1.0,
                 image: object = "") -> list[Tile]:
    """Windows (scene pixels) whose rescaled size is ``slice_size``, overlapping by ``overlap``.

    Same geometry as training chips (:func:`rsdet_compress.data.tiling.tile_grid`):
    every window has the same size and the last one of a row or column is
    shifted inward to end at the border. More windows than
    ``MAX_TILES_PER_IMAGE`` (``--overlap 0.999`` gives ~700k for a 0.76 MP
    image) are refused by counting, before the list is built or a pixel read.
    """
    if slice_size < 1 or rescale <= 0:
        raise ValueError(f"slice_size and rescale must be positive, got {slice_size}, {rescale}")
    window = max(1, round(slice_size / rescale))
    check_tile_count(width, height, window, overlap, image=image, option="--overlap")
    return tile_grid(width, height, window, overlap)


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """Device and float dtype of a torch model's weights; CPU float32 for other callables (ONNX)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
    return torch.device("cpu"), torch.float32


@torch.inference_mode()
def detect_chips(model, chips: np.ndarray, conf: float = 0.25, iou: float = 0.7,
                 max_det: int = 1000) -> list[np.ndarray]:
    """Per-chip detections (N x 6: x1 y1 x2 y2 score cls, chip pixels) of a B x S x S x 3 RGB uint8 batch.

    ``model`` is a torch detector in eval mode or any callable with its convention
    (an ONNX runtime wrapper): float RGB 0..1 in, raw ultralytics head output out.
    """
    device, dtype = model_device_dtype(model)
    x = torch.from_numpy(chips).to(device).permute(0, 3, 1, 2).to(dtype).div_(255).contiguous()
    out = model(x)
    preds = out[0] if isinstance(out, (tuple, list)) else out
    preds = torch.as_tensor(preds)
    end2end = bool(getattr(model, "end2end", False))
    if not end2end and preds.ndim == 3 and preds.shape[-1] == 6:
        # ultralytics reads a last dim of 6 as end-to-end output; a zero-score anchor keeps the NMS path.
        preds = torch.cat([preds, preds.new_zeros(*preds.shape[:2], 1)], dim=-1)
    dets = non_max_suppression(preds, conf, iou, max_det=max_det, end2end=end2end, max_time_img=1e6)
    return [d[:, :6].float().cpu().numpy() for d in dets]


def make_chip(window: np.ndarray, rescale: float, input_size: int) -> tuple[np.ndarray, RatioPad]:
    """A window resized by ``rescale`` and padded to ``input_size`` square; gains map back to the window."""
    h, w = window.shape[:2]
    if rescale != 1.0:
        size = (max(1, round(w * rescale)), max(1, round(h * rescale)))
        window = cv2.resize(window, size, interpolation=cv2.INTER_AREA if rescale < 1 else cv2.INTER_LINEAR)
    chip, ((gh, gw), pad) = letterbox(window, input_size, scale_up=False)
    return chip, ((gh * window.shape[0] / h, gw * window.shape[1] / w), pad)


def to_scene(dets: np.ndarray, ratio_pad: RatioPad, tile: Tile) -> np.ndarray:
    """Chip-pixel detections -> scene pixels (clipped to the window), a copy."""
    (gy, gx), (pl, pt) = ratio_pad
    out = np.array(dets, dtype=np.float64, copy=True).reshape(-1, 6)
    out[:, [0, 2]] = np.clip((out[:, [0, 2]] - pl) / gx, 0, tile.w) + tile.x0
    out[:, [1, 3]] = np.clip((out[:, [1, 3]] - pt) / gy, 0, tile.h) + tile.y0
    return out


def cut_by_border(boxes: np.ndarray, tile: Tile, width: int, height: int, margin: float) -> np.ndarray:
    """Which scene-pixel boxes touch a border of ``tile`` that lies inside the scene (truncated there)."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    right, bottom = tile.x0 + tile.w, tile.y0 + tile.h
    return (((tile.x0 > 0) & (x1 <= tile.x0 + margin)) | ((right < width) & (x2 >= right - margin))
            | ((tile.y0 > 0) & (y1 <= tile.y0 + margin)) | ((bottom < height) & (y2 >= bottom - margin)))


@dataclass
class TileBatch:
    """A batch of chips ready for the model and the windows they came from."""

    tiles: list[Tile]
    chips: np.ndarray  # B x S x S x 3 RGB uint8
    ratio_pads: list[RatioPad]


def iter_batches(reader: SceneReader, tiles: list[Tile], rescale: float, input_size: int,
                 batch: int) -> Iterator[TileBatch]:
    """Chips of ``tiles`` in batches of ``batch``; one batch is read at a time (bounded memory)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    for start in range(0, len(tiles), batch):
        part = tiles[start:start + batch]
        chips = np.full((len(part), input_size, input_size, 3), PAD_VALUE, dtype=np.uint8)
        pads = []
        for k, t in enumerate(part):
            chips[k], rp = make_chip(reader.read(t), rescale, input_size)
            pads.append(rp)
        yield TileBatch(part, chips, pads)


def _inter(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt, rb = torch.max(a[:, None, :2], b[None, :, :2]), torch.min(a[:, None, 2:], b[None, :, 2:])
    return (rb - lt).clamp(min=0).prod(-1)


def _area(b: torch.Tensor) -> torch.Tensor:
    return ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).clamp(min=1e-9)


def merge_detections(dets: np.ndarray, tile_ids: np.ndarray, cut: np.ndarray, method: str = "nms",
                     iou: float = 0.5, ios: float = 0.5, chunk: int = 256) -> np.ndarray:
    """Merge per-window detections (N x 6, scene pixels) into one set, highest score first.

    ``tile_ids`` names each box's window (-1: the full-image pass) and ``cut``
    marks boxes touching an interior window border. Cut boxes covered (>= ``ios``
    of their area) by a complete same-class box from another window are dropped;
    remaining cut pieces of one object are unioned; then class-wise NMS at
    ``iou``, or weighted box fusion (``method="wbf"``: each kept box becomes the
    score-weighted mean of the boxes it suppressed, keeping its score).
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method must be nms or wbf, got {method!r}")
    d = torch.as_tensor(np.asarray(dets, dtype=np.float64).reshape(-1, 6))
    tid, cut = torch.as_tensor(tile_ids).long(), torch.as_tensor(cut).bool()
    if len(d) == 0:
        return d.numpy()
    boxes, cls = d[:, :4], d[:, 5].long()
    # 1. cut pieces whose neighbour saw the whole object
    whole = (~cut).nonzero().flatten()
    drop = torch.zeros(len(d), dtype=torch.bool)
    for part in cut.nonzero().flatten().split(chunk):
        for other in whole.split(16 * chunk):  # pairwise in blocks: bounded memory on dense scenes
            cover = _inter(boxes[part], boxes[other]) / _area(boxes[part])[:, None] >= ios
            cover &= (cls[part, None] == cls[None, other]) & (tid[part, None] != tid[None, other])
            drop[part] |= cover.any(1)
    d, tid, cut = d[~drop], tid[~drop], cut[~drop]
    # 2. union of the remaining pieces of one object (greedy NMM, intersection over the smaller box),
    #    grown piece by piece (at most one per window) so pieces meeting only at a corner join too
    pieces = cut.nonzero().flatten()
    if len(pieces) > 1:
        pb, pt = d[pieces], tid[pieces]
        used = torch.zeros(len(pieces), dtype=torch.bool)
        gone = torch.zeros(len(d), dtype=torch.bool)
        for i in torch.argsort(pb[:, 4], descending=True).tolist():
            if used[i]:
                continue
            group = torch.zeros(len(pieces), dtype=torch.bool)
            group[i] = True
            union = pb[i, :4].clone()
            while True:
                overlap = _inter(union[None], pb[:, :4])[0] / torch.minimum(_area(union[None]), _area(pb[:, :4]))
                new = ~used & ~group & (pb[:, 5] == pb[i, 5]) & (overlap >= ios) & ~torch.isin(pt, pt[group])
                if not new.any():
                    break
                group[torch.where(new, overlap, -1.0).argmax()] = True  # the best one; then look again
                union = torch.cat([pb[group, :2].min(0).values, pb[group, 2:4].max(0).values])
            used |= group
            d[pieces[i], :4] = union
            gone[pieces[group]] = True
            gone[pieces[i]] = False
        d = d[~gone]
    # 3. duplicates of the overlaps
    boxes, scores, cls = d[:, :4], d[:, 4], d[:, 5].long()
    keep = batched_nms(boxes.float(), scores.float(), cls, iou)
    if method == "wbf" and len(keep):
        owner = torch.empty(len(d), dtype=torch.long)
        for part in torch.arange(len(d)).split(chunk):
            m = box_iou(boxes[part], boxes[keep]) > iou
            m &= (cls[part, None] == cls[None, keep]) & (scores[part, None] <= scores[None, keep])
            m |= part[:, None] == keep[None, :]
            # keep is score-sorted, so the first match is the box's suppressor (none: rounding, left out)
            owner[part] = torch.where(m.any(1), m.float().argmax(1), len(keep))
        fused = torch.zeros(len(keep) + 1, 4, dtype=d.dtype).index_add_(0, owner, boxes * scores[:, None])
        total = torch.zeros(len(keep) + 1, dtype=d.dtype).index_add_(0, owner, scores)
        fused, total = fused[:-1], total[:-1]
        d[keep, :4] = fused / total[:, None].clamp(min=1e-12)
    return d[keep].numpy()


@dataclass(frozen=True)
class SliceOptions:
    """How a scene is sliced and merged; bad values raise UserError naming the CLI flag.

    ``slice_size`` is the window side in model-input pixels, i.e. in the image
    rescaled by ``rescale`` (like ``data prepare --tile``): the window read from
    the scene is ``slice_size / rescale`` pixels.
    """

    slice_size: int | None = None
    overlap: float = 0.2
    rescale: float = 1.0
    batch: int = 8
    conf: float = 0.25
    iou: float = 0.7
    merge: str = "nms"
    merge_iou: float = 0.5
    full_pass: bool = False
    full_pass_size: int | None = None  # model input side of the full-image pass (default: the slice input)
    stride: int = 32

    def __post_init__(self) -> None:
        if self.slice_size is not None and self.slice_size < 8:
            raise UserError(f"--slice must be >= 8 pixels, got {self.slice_size}")
        if not 0.0 <= self.overlap < 1.0:
            raise UserError(f"--overlap must be in [0, 1), got {self.overlap}")
        if self.batch < 1:
            raise UserError(f"--batch must be >= 1, got {self.batch}")
        if self.merge not in MERGE_METHODS:
            raise UserError(f"--merge must be one of {', '.join(MERGE_METHODS)}, got {self.merge!r}")
        if not 0.0 < self.iou <= 1.0:
            raise UserError(f"--iou must be in (0, 1], got {self.iou}")
        if not 0.0 <= self.conf <= 1.0:
            raise UserError(f"--conf must be in [0, 1], got {self.conf}")
        if not 0.0 < self.merge_iou <= 1.0:
            raise UserError(f"merge_iou must be in (0, 1], got {self.merge_iou}")
        if self.rescale <= 0:
            raise UserError(f"rescale must be > 0, got {self.rescale}")

    @property
    def input_size(self) -> int:
        """Side of the square model input (the slice rounded up to the stride)."""
        if self.slice_size is None:
            raise ValueError("slice_size is not set")
        return int(math.ceil(self.slice_size / self.stride) * self.stride)


def predict_sliced(model, reader: SceneReader, opts: SliceOptions, progress: bool = True) -> tuple[np.ndarray, int]:
    """Detections of the whole scene (N x 6 scene pixels, merged) and the number of windows run."""
    inp = opts.input_size
    tiles = tile_windows(reader.width, reader.height, opts.slice_size, opts.overlap, opts.rescale, reader.path)
    found, ids, cuts = [np.zeros((0, 6))], [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=bool)]
    done = 0
    with tqdm(total=len(tiles), desc=reader.path.name, unit="tile", disable=None if progress else True,
              leave=False) as bar:
        for b in iter_batches(reader, tiles, opts.rescale, inp, opts.batch):
            outs = detect_chips(model, b.chips, opts.conf, opts.iou)
            for k, (tile, rp, det) in enumerate(zip(b.tiles, b.ratio_pads, outs)):
                boxes = to_scene(det, rp, tile)
                found.append(boxes)
                ids.append(np.full(len(boxes), done + k))
                cuts.append(cut_by_border(boxes, tile, reader.width, reader.height, CUT_MARGIN / rp[0][1]))
            done += len(b.tiles)
            bar.update(len(b.tiles))
    if opts.full_pass:
        size = int(math.ceil((opts.full_pass_size or inp) / opts.stride) * opts.stride)
        image, _ = reader.overview(size)
        chip, ((gy, gx), pad) = letterbox(image, size, scale_up=False)
        det = detect_chips(model, chip[None], opts.conf, opts.iou)[0]
        sy, sx = image.shape[0] / reader.height, image.shape[1] / reader.width
        boxes = to_scene(det, ((gy * sy, gx * sx), pad), Tile(0, 0, reader.width, reader.height))
        found.append(boxes)
        ids.append(np.full(len(boxes), -1))
        cuts.append(np.zeros(len(boxes), dtype=bool))
    merged = merge_detections(np.concatenate(found), np.concatenate(ids), np.concatenate(cuts),
                              opts.merge, opts.merge_iou)
    return merged, len(tiles)
