"""The dataset YAML that ``data prepare`` writes (and ultralytics reads), checked up front.

Checking here, before ultralytics sees it, turns "dataset not found, trying
to download" into one line naming the file and the field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rsdet_compress.data.record import list_images, parse_names
from rsdet_compress.data.split import SPLITS
from rsdet_compress.errors import UserError
from rsdet_compress.textio import read_text


@dataclass
class DataConfig:
    """A validated dataset YAML: class names, image folder and COCO ground truth per split."""

    yaml_path: Path
    names: list[str]
    images: dict[str, Path]
    coco: dict[str, Path]
    #: how the chips were made (tile, rescale...), as written by ``data prepare``.
    prep: dict = field(default_factory=dict)

    @property
    def rescale(self) -> float:
        return float(self.prep.get("rescale", 1.0))

    def split_images(self, split: str) -> Path:
        """Image folder of ``split``; an error naming the YAML field if it has none."""
        if split not in self.images:
            raise UserError(f"{self.yaml_path}: no '{split}' split")
        folder = self.images[split]
        if not folder.is_dir() or not list_images(folder):
            raise UserError(f"{self.yaml_path}: field '{split}' points at {folder}, which has no images")
        return folder

    def split_coco(self, split: str) -> Path:
        """COCO ground-truth JSON of ``split`` (written by ``data prepare``)."""
        path = self.coco.get(split)
        if path is None or not path.is_file():
            raise UserError(f"{self.yaml_path}: no COCO ground truth for split '{split}' "
                            "(prepare the data with `rsdet-compress data prepare`)")
        return path


def load_data_config(path: str | Path) -> DataConfig:
    """Read and check a dataset YAML; paths are relative to the YAML (or its ``path:``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: dataset YAML not found")
    try:
        data = yaml.safe_load(read_text(path, "dataset YAML"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with 'names', 'train', 'val'")
    names = parse_names(data.get("names"), str(path))
    if not names:
        raise UserError(f"{path}: field 'names' missing or empty")
    for key in ("path", *SPLITS):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise UserError(f"{path}: field '{key}' must be one folder path, got {data[key]!r}")
    for key, kind in (("coco", dict), ("rsdet", dict)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise UserError(f"{path}: field '{key}' must be a mapping, got {data[key]!r}")
    root = Path(data.get("path") or path.parent)
    if not root.is_absolute():
        root = path.parent / root if data.get("path") else root
    images = {s: root / data[s] for s in SPLITS if data.get(s)}
    for s in ("train", "val"):
        if s not in images:
            raise UserError(f"{path}: field '{s}' missing")
    coco_paths = data.get("coco") or {}
    if not all(isinstance(p, str) for p in coco_paths.values()):
        raise UserError(f"{path}: field 'coco' must map each split to one JSON path")
    coco = {str(s): root / p for s, p in coco_paths.items()}
    cfg = DataConfig(path, names, images, coco, data.get("rsdet") or {})
    for s in ("train", "val"):
        cfg.split_images(s)
    return cfg
