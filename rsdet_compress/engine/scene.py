"""Reading a scene window by window: small images decoded once, huge rasters through rasterio windows.

Used by sliced prediction (:mod:`rsdet_compress.engine.slicer`), so a 10k x 10k
GeoTIFF never sits in memory whole; also carries the raster's georeferencing.

Common photo formats (JPEG, PNG, BMP, WebP) are decoded by
:mod:`rsdet_compress.data.imageio`, the decoder training chips were made with:
same EXIF orientation rule, and a truncated file is refused
(:class:`~rsdet_compress.data.imageio.CorruptImage`) instead of being inferred
on as a grey or noisy bottom half.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from rsdet_compress.data.imageio import CorruptImage, image_size, read_image
from rsdet_compress.data.tiling import Tile

#: images up to this many pixels (~120 MB as RGB) are decoded at once; larger ones window by window.
FULL_DECODE_PIXELS = 40_000_000
#: GDAL's block cache while reading a scene (MB): bounds memory on huge rasters.
GDAL_CACHE_MB = 64
_CV2_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

class SceneReader:
    """RGB uint8 windows of one image file, without decoding a large file at once.

    rasterio (GDAL) reads windows of GeoTIFFs and every raster format GDAL
    knows; a file of at most ``max_pixels`` is decoded once (OpenCV for common
    formats) and windows are slices of it; PIL is the fallback for what GDAL
    cannot open. 1-band images are replicated to grey RGB, extra bands are
    ignored, and non-8-bit data is stretched to 0..255 by its 0.5/99.5 percentiles.
    """

    def __init__(self, path: str | Path, max_pixels: int = FULL_DECODE_PIXELS) -> None:
        # rasterio (GDAL) is imported when a scene is opened, not at CLI start-up
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

        self.path = Path(path)
        self._env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)
        self._env.__enter__()
        self._ds = self._full = None
        self._stretch: tuple[float, float] | None = None
        self.crs = self.transform = self.gcps = None
        photo = self.path.suffix.lower() in _CV2_SUFFIXES
        try:
            # complete and readable (a cut JPEG/PNG raises here), and its size as displayed
            shown = image_size(self.path) if photo else None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                    self._ds = rasterio.open(self.path)
            except RasterioIOError:
                self._full = self._pil_decode()
            if self._ds is not None:
                ds = self._ds
                self.width, self.height = ds.width, ds.height
                self.crs, self.transform, self.gcps = ds.crs, ds.transform, ds.gcps
                self._bands = [1] if ds.count < 3 else [1, 2, 3]
                if ds.dtypes[0] != "uint8":
                    self._stretch = self._percentiles()
                # an EXIF-rotated photo: only the full decode applies the rotation its labels are drawn in
                if self.width * self.height <= max_pixels or (shown is not None and shown != (ds.width, ds.height)):
                    self._full = self._small_decode()
                    self.height, self.width = self._full.shape[:2]
            else:
                self.height, self.width = self._full.shape[:2]
        except BaseException:
            self.close()
            raise

    def _pil_decode(self) -> np.ndarray:
        if self.path.suffix.lower() in _CV2_SUFFIXES:
            return cv2.cvtColor(read_image(self.path), cv2.COLOR_BGR2RGB)

        # PIL's own open: ultralytics wraps Image.open to pip-install a HEIF plugin on unknown files
        pil_open = getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", Image.open)
        try:
            with warnings.catch_warnings():  # a clear error below beats PIL's notes on a bad file
                warnings.simplefilter("ignore")
                with pil_open(self.path) as im:
                    return np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError, ImportError, Image.DecompressionBombError) as e:
            raise CorruptImage(f"{self.path}: unreadable image ({type(e).__name__})") from None

    def _small_decode(self) -> np.ndarray:
        if self.path.suffix.lower() in _CV2_SUFFIXES and self._stretch is None:
            return cv2.cvtColor(read_image(self.path), cv2.COLOR_BGR2RGB)  # the decoder training chips were made with
        return self._rio_read(None)

    def _percentiles(self) -> tuple[float, float]:
        sample = self._ds.read(self._bands, out_shape=(len(self._bands), *self._reduced_shape(1024)))
        lo, hi = np.percentile(sample, (0.5, 99.5))
        return float(lo), float(max(hi, lo + 1))

    def _reduced_shape(self, max_side: int) -> tuple[int, int]:
        s = min(1.0, max_side / max(self.width, self.height))
        return max(1, round(self.height * s)), max(1, round(self.width * s))

    def _to_rgb(self, bands: np.ndarray) -> np.ndarray:
        """C x H x W raster bands -> H x W x 3 uint8."""
        if self._stretch is not None:
            lo, hi = self._stretch
            bands = np.clip((bands.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
        if bands.shape[0] == 1:
            bands = np.repeat(bands, 3, axis=0)
        return np.ascontiguousarray(bands.transpose(1, 2, 0))

    def _rio_read(self, window, out_shape: tuple[int, int] | None = None) -> np.ndarray:
        from rasterio.enums import Resampling  # GDAL: imported with the scene, see __init__
        from rasterio.errors import RasterioIOError
        shape = None if out_shape is None else (len(self._bands), *out_shape)
        try:
            data = self._ds.read(self._bands, window=window, out_shape=shape, resampling=Resampling.average)
        except RasterioIOError as e:
            raise CorruptImage(f"{self.path}: unreadable image data ({str(e)[:80]})") from None
        return self._to_rgb(data)

    @property
    def decoded(self) -> bool:
        """Whether the whole image is in memory (small images)."""
        return self._full is not None

    def read(self, tile: Tile) -> np.ndarray:
        """The pixels of ``tile`` (H x W x 3 RGB uint8)."""
        if self._full is not None:
            return self._full[tile.y0:tile.y0 + tile.h, tile.x0:tile.x0 + tile.w]
        from rasterio.windows import Window  # GDAL: imported with the scene, see __init__
        return self._rio_read(Window(tile.x0, tile.y0, tile.w, tile.h))

    def overview(self, max_side: int) -> tuple[np.ndarray, float]:
        """The whole scene shrunk to fit ``max_side`` (never enlarged), and the scale applied.

        A large raster is decimated by GDAL block by block (its overviews when it has some).
        """
        oh, ow = self._reduced_shape(max_side)
        if self._full is not None:
            img = self._full if (oh, ow) == self._full.shape[:2] else \
                cv2.resize(self._full, (ow, oh), interpolation=cv2.INTER_AREA)
        else:
            img = self._rio_read(None, out_shape=(oh, ow))
        return img, ow / self.width

    def close(self) -> None:
        """Close the raster and leave the GDAL environment."""
        if self._ds is not None:
            self._ds.close()
            self._ds = None
        if self._env is not None:
            self._env.__exit__(None, None, None)
            self._env = None

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
