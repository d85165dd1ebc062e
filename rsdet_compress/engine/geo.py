"""Detections as GeoJSON: pixel boxes -> polygons in the raster's CRS through its affine transform.

A GeoTIFF's transform maps pixel corner coordinates (column, row) to map
coordinates, so a box ``x1 y1 x2 y2`` becomes the polygon of its four mapped
corners (a rotated or sheared raster gives a true parallelogram). The CRS is
written as the GeoJSON 2008 ``crs`` member (``urn:ogc:def:crs:EPSG::<code>``,
or the CRS's WKT), which GDAL/QGIS read; RFC 7946 readers ignore it.

A raster without georeferencing still gets its GeoJSON, in pixel coordinates
(x right, y down), with a :class:`GeoreferenceWarning`.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsdet_compress.atomic import write_text


class GeoreferenceWarning(UserWarning):
    """The raster has no (or incomplete) georeferencing; outputs fall back to pixel coordinates."""


@dataclass(frozen=True)
class Georef:
    """Where a raster lies: its pixel -> map affine transform and CRS (None: unknown)."""

    transform: Any  # affine.Affine
    crs: Any = None  # rasterio.crs.CRS


def georef_of(transform: Any, crs: Any = None, gcps: Any = None) -> Georef | None:
    """The georeferencing of a raster from rasterio's ``transform``, ``crs`` and ``gcps``.

    None when the transform is the identity and there are no ground control
    points (rasterio's answer for a plain image). A GCP-only raster gets the
    least-squares affine of its GCPs.
    """
    if transform is not None and not transform.is_identity:
        return Georef(transform, crs)
    points, gcp_crs = gcps if gcps else ((), None)
    if points:
        from rasterio.transform import from_gcps  # GDAL: only for rasters georeferenced by GCPs
        return Georef(from_gcps(points), gcp_crs)
    return None


def crs_member(crs: Any) -> dict | None:
    """GeoJSON 2008 ``crs`` object for a rasterio CRS (EPSG URN when it has a code)."""
    if crs is None:
        return None
    epsg = crs.to_epsg()
    name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()
    return {"type": "name", "properties": {"name": name}}


def _ring(corners: np.ndarray) -> list[list[float]]:
    """A closed, counter-clockwise (RFC 7946 right-hand rule) ring from 4 corners."""
    x, y = corners[:, 0], corners[:, 1]
    if np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y) < 0:  # twice the signed area
        corners = corners[::-1]
    return [[float(a), float(b)] for a, b in corners] + [[float(corners[0, 0]), float(corners[0, 1])]]


def to_geojson(dets: np.ndarray, names: list[str], georef: Georef | None, source: str = "") -> dict:
    """A FeatureCollection of ``dets`` (N x 6: x1 y1 x2 y2 score cls, pixels), one Polygon per box.

    Properties: ``class``, ``class_id``, ``score`` and ``bbox_px``. Without
    ``georef`` the coordinates are pixels and a :class:`GeoreferenceWarning` is
    issued; a transform without CRS gives map coordinates without ``crs`` (also warned).
    """
    if georef is None:
        warnings.warn(f"{source or 'image'}: no georeferencing; GeoJSON is in pixel coordinates",
                      GeoreferenceWarning, stacklevel=2)
    elif georef.crs is None:
        warnings.warn(f"{source or 'image'}: georeferenced without a CRS; GeoJSON has no crs member",
                      GeoreferenceWarning, stacklevel=2)
    dets = np.asarray(dets, dtype=np.float64).reshape(-1, 6)
    features = []
    for i, (x1, y1, x2, y2, score, cls) in enumerate(dets.tolist()):
        corners = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)
        if georef is not None:
            corners = np.stack(georef.transform @ (corners[:, 0], corners[:, 1]), axis=1)
        features.append({
            "type": "Feature", "id": i + 1,
            "geometry": {"type": "Polygon", "coordinates": [_ring(corners)]},
            "properties": {"class": names[int(cls)] if int(cls) < len(names) else str(int(cls)),
                           "class_id": int(cls), "score": round(float(score), 4),
                           "bbox_px": [round(v, 2) for v in (x1, y1, x2, y2)]},
        })
    fc: dict[str, Any] = {"type": "FeatureCollection"}
    crs = crs_member(georef.crs) if georef is not None else None
    if crs is not None:
        fc["crs"] = crs
    fc["rsdet"] = {"source": source, "coordinates": "map" if georef is not None else "pixel"}
    fc["features"] = features
    return fc


def write_geojson(path: str | Path, fc: dict) -> Path:
    """Write a FeatureCollection atomically (complete or absent, never half-written)."""
    return write_text(path, json.dumps(fc))
