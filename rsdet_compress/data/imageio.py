"""The one place images are decoded: pixels and sizes under one orientation rule, corrupt files refused.

Orientation rule: the EXIF orientation tag is APPLIED, everywhere. Boxes stay
correct only if the size used to scale and clip labels and the pixels that are
cut into chips are in the same frame, and the frame labels are drawn in is the
displayed one: ultralytics checks YOLO labels against ``exif_size`` (the size
with orientation applied, ``ultralytics.data.utils.verify_image_label``) and
trains on cv2-decoded pixels, which are rotated; browsers (CVAT, Label Studio)
and Roboflow's auto-orient show the rotated image to annotators. Before this
module, sizes came from PIL without orientation and pixels from cv2 with it,
so a rotated photo lost most of its boxes.

The tag is read once, by PIL, and applied by us (:func:`_orient`) for every
format, instead of relying on cv2's own EXIF handling, which differs between
imread/imdecode, formats and OpenCV versions (ultralytics works around it for
TIFF/WebP): :func:`image_size` and :func:`read_image` agree by construction.

Truncation: cv2 decodes a JPEG cut short into a complete-looking image with a
grey bottom and only prints a warning, so chips of nothing would keep their
labels. JPEGs are therefore decoded once more by PIL at 1/8 scale (libjpeg's
DCT scaling: ~12 ms for a 2560 px scene, still reading every byte of the
entropy-coded data), which raises on a premature end; PNGs must end with their
IEND chunk (cv2 returns None for most cut PNGs, but not reliably for all).
"""
from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from rsdet_compress.errors import UserError

#: EXIF tag id of the orientation.
ORIENTATION = 0x0112
#: Orientations (EXIF values) whose display swaps width and height.
_SWAPS = {5, 6, 7, 8}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # chunk type + its fixed CRC: the last 8 bytes of every complete PNG
_JPEG_SOI = b"\xff\xd8\xff"
#: PIL errors that mean "not a (complete) image this decoder can read".
_PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, ImportError,
               Image.DecompressionBombError)
_bomb_lock = threading.Lock()


class CorruptImage(UserError):
    """An image file that cannot be decoded completely (unreadable, not an image, truncated)."""


@contextlib.contextmanager
def _no_pixel_limit() -> Iterator[None]:
    """Lift PIL's decompression-bomb limit (179 Mpx) while we only read headers or decode at 1/8:
    satellite scenes are legitimately that large, and cv2 (limit 2^30 px) decodes the pixels."""
    with _bomb_lock:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = limit, truncated


def _open(path: Path) -> Image.Image:
    """PIL's own ``Image.open``: ultralytics wraps it to pip-install a HEIF plugin on unknown files."""
    return getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", Image.open)(path)


def _corrupt(path: Path, reason: str) -> CorruptImage:
    return CorruptImage(f"{path}: unreadable or corrupt image ({reason})")


def _header(path: Path) -> tuple[tuple[int, int], int] | None:
    """((width, height) as stored, EXIF orientation) from PIL, or None when PIL cannot
    identify the format (cv2 may still decode it: e.g. some multi-band TIFFs)."""
    if not path.is_file():  # say so plainly: "[Errno 2]" inside "corrupt image" reads as damage
        raise CorruptImage(f"{path}: image file not found")
    try:
        with _no_pixel_limit(), _open(path) as im:
            size = im.size
            im.verify()  # file structure (PNG chunk CRCs...), without decoding all pixels
        with _no_pixel_limit(), _open(path) as im:
            exif = im.getexif()
            orientation = exif.get(ORIENTATION, 1)
            fmt = im.format
    except UnidentifiedImageError:
        return None
    except _PIL_ERRORS as e:
        raise _corrupt(path, str(e) or type(e).__name__) from None
    if fmt == "JPEG":
        _check_jpeg(path)
    elif fmt == "PNG":
        _check_png(path)
    return size, orientation if orientation in range(1, 9) else 1


def _check_jpeg(path: Path) -> None:
    """Decode at 1/8 scale so that a premature end of the entropy-coded data raises."""
    try:
        with _no_pixel_limit(), _open(path) as im:
            im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
    except _PIL_ERRORS as e:
        raise _corrupt(path, f"truncated or damaged JPEG: {e}") from None


def _check_png(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read()
    except OSError as e:
        raise _corrupt(path, e.strerror or str(e)) from None
    if _PNG_IEND not in tail:
        raise _corrupt(path, "truncated PNG: no IEND chunk at the end")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), checked for truncation.

    Raises :class:`CorruptImage` if the file is not a complete, readable image.
    """
    path = Path(path)
    head = _header(path)
    if head is None:  # a format PIL does not know: let cv2 decide, at the cost of a decode
        img = _decode(path)
        return int(img.shape[1]), int(img.shape[0])
    (w, h), orientation = head
    return (h, w) if orientation in _SWAPS else (w, h)


def _decode(path: Path) -> np.ndarray:
    try:
        data = np.fromfile(path, np.uint8)  # not cv2.imread: non-ASCII paths work too
    except OSError as e:
        raise _corrupt(path, e.strerror or str(e)) from None
    if not data.size:
        raise _corrupt(path, "empty file")
    img = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise _corrupt(path, "cannot be decoded")
    return img


def _orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to H x W x C pixels, as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        img = img[:, ::-1]
    elif orientation == 3:
        img = img[::-1, ::-1]
    elif orientation == 4:
        img = img[::-1]
    elif orientation == 5:
        img = img.transpose(1, 0, 2)
    elif orientation == 6:
        img = img.transpose(1, 0, 2)[:, ::-1]  # 90 degrees clockwise
    elif orientation == 7:
        img = img.transpose(1, 0, 2)[::-1, ::-1]
    elif orientation == 8:
        img = img.transpose(1, 0, 2)[::-1]  # 90 degrees counter-clockwise
    return np.ascontiguousarray(img)


def read_image(path: str | Path) -> np.ndarray:
    """Decode ``path`` to BGR uint8 H x W x 3 as displayed (EXIF orientation applied).

    Grey, 16-bit and alpha images are converted the way cv2's ``IMREAD_COLOR``
    does. Raises :class:`CorruptImage` if the file is unreadable or truncated.
    """
    path = Path(path)
    head = _header(path)
    img = _decode(path)
    if head is not None:
        (w, h), orientation = head
        if (img.shape[1], img.shape[0]) != (w, h):
            raise _corrupt(path, f"header says {w}x{h}, pixels are {img.shape[1]}x{img.shape[0]}")
        img = _orient(img, orientation)
    return img
