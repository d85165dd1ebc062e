"""The dataset YAML: the one ``data prepare`` writes, or any ultralytics data YAML, checked up front.

Checking here, before ultralytics sees it, turns "dataset not found, trying
to download" into one line naming the file and the field. A YAML without
``coco:`` ground truth (a plain ultralytics data set) gets it derived from its
YOLO labels on first use (:mod:`rsdet_compress.data.yolo_coco`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rsdet_compress.atomic import write_text
from rsdet_compress.data.record import list_images, parse_names
from rsdet_compress.data.split import SPLITS
from rsdet_compress.data.yolo_coco import derive_coco
from rsdet_compress.errors import UserError
from rsdet_compress.textio import read_text


@dataclass
class DataConfig:
    """A validated dataset YAML: class names, image folder and COCO ground truth per split.

    ``coco`` holds the JSON files the YAML names; splits without one derive theirs from the YOLO labels.
    """

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

    def ultralytics_yaml(self, folder: Path) -> Path:
        """A copy of this YAML for ultralytics' trainer in ``folder``, every split an absolute folder.

        ultralytics resolves a relative ``path:`` against the working directory or its datasets
        folder, we against the YAML's folder first: given absolute paths, both read the same images.
        """
        body = {"path": "", "names": dict(enumerate(self.names)), "nc": len(self.names),
                **{s: str(p.resolve()) for s, p in self.images.items()}}
        return write_text(Path(folder) / "data.ultralytics.yaml", yaml.safe_dump(body, sort_keys=False))

    def split_coco(self, split: str) -> Path:
        """COCO ground-truth JSON of ``split``: the YAML's, or derived from the split's YOLO labels."""
        path = self.coco.get(split)
        if path is None:
            return derive_coco(self.split_images(split), self.names, split, str(self.yaml_path))
        if not path.is_file():
            raise UserError(f"{self.yaml_path}: field 'coco.{split}' points at {path}, which does not exist")
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
            raise UserError(f"{path}: field '{key}' must be one folder path, got {data[key]!r} "
                            "(lists of folders are not supported: give one image folder per split)")
        if key in SPLITS and isinstance(data.get(key), str) and data[key].endswith(".txt"):
            raise UserError(f"{path}: field '{key}' is an image list file ({data[key]}); "
                            "give the split's image folder instead")
    for key, kind in (("coco", dict), ("rsdet", dict)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise UserError(f"{path}: field '{key}' must be a mapping, got {data[key]!r}")
    root = _root(path, data.get("path"))
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


def _root(yaml_path: Path, value: str | None) -> Path:
    """The folder split paths are relative to: ``path:`` (or the YAML's folder when absent).

    A relative ``path:`` is taken from the YAML's folder (what ``data prepare`` writes), else,
    as ultralytics reads it, from the working directory or ultralytics' datasets folder.
    """
    if not value:
        return yaml_path.parent
    root = Path(value).expanduser()
    if root.is_absolute():
        return root
    candidates = [yaml_path.parent / root, root]
    from ultralytics.utils import DATASETS_DIR  # here: importing ultralytics takes seconds, needed only now
    candidates.append(Path(DATASETS_DIR) / root)
    return next((c for c in candidates if c.is_dir()), candidates[0])
