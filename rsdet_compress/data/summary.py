"""What ``data prepare`` reports: images, tiles, boxes per class, a box-size histogram, skips."""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from rsdet_compress.data.record import Box
from rsdet_compress.data.split import SPLITS

#: Box size bins on sqrt(area) in chip pixels; COCO's small/medium/large cut at 32 and 96.
SIZE_BINS = (8, 16, 32, 64, 96, 128, 256)


def size_bin(box: Box) -> str:
    """Label of the sqrt(area) bin a box falls in, e.g. "32-64"."""
    s = math.sqrt(box.area)
    lo = 0
    for hi in SIZE_BINS:
        if s < hi:
            return f"{lo}-{hi}"
        lo = hi
    return f">={SIZE_BINS[-1]}"


def _bin_order() -> list[str]:
    edges = (0, *SIZE_BINS)
    return [f"{a}-{b}" for a, b in zip(edges, edges[1:])] + [f">={SIZE_BINS[-1]}"]


@dataclass
class PrepareSummary:
    """Counts gathered while tiling, printable as a table and serialisable to JSON."""

    name: str
    classes: list[str]
    sources: Counter = field(default_factory=Counter)
    tiles: Counter = field(default_factory=Counter)
    boxes: dict = field(default_factory=lambda: defaultdict(Counter))
    sizes: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)
    empty_skipped: int = 0

    def add_source(self, split: str) -> None:
        self.sources[split] += 1

    def add_tile(self, split: str, boxes: list[Box]) -> None:
        self.tiles[split] += 1
        for b in boxes:
            self.boxes[split][self.classes[b.cls]] += 1
            self.sizes[size_bin(b)] += 1

    def to_dict(self) -> dict:
        return {
            "dataset": self.name, "classes": self.classes,
            "source_images": {s: self.sources[s] for s in SPLITS},
            "tiles": {s: self.tiles[s] for s in SPLITS},
            "boxes": {s: {c: self.boxes[s][c] for c in self.classes} for s in SPLITS},
            "box_size_histogram": {b: self.sizes[b] for b in _bin_order()},
            "empty_train_tiles_skipped": self.empty_skipped,
            "warnings": dict(self.warnings),
        }

    def format(self) -> str:
        """A plain-text report for the terminal."""
        lines = [f"data set {self.name}: {len(self.classes)} classes"]
        head = f"{'':22}" + "".join(f"{s:>10}" for s in SPLITS)
        lines += [head, f"{'source images':22}" + "".join(f"{self.sources[s]:>10}" for s in SPLITS),
                  f"{'tiles':22}" + "".join(f"{self.tiles[s]:>10}" for s in SPLITS)]
        for c in self.classes:
            lines.append(f"{'boxes ' + c:22.22}" + "".join(f"{self.boxes[s][c]:>10}" for s in SPLITS))
        total = sum(self.sizes.values()) or 1
        lines.append("box size histogram (sqrt(area), chip pixels):")
        for b in _bin_order():
            n = self.sizes[b]
            lines.append(f"  {b:>8}: {n:>7}  {'#' * round(40 * n / total)}")
        if self.empty_skipped:
            lines.append(f"empty train tiles skipped: {self.empty_skipped}")
        for k, n in sorted(self.warnings.items()):
            lines.append(f"warning: {n} x {k}")
        return "\n".join(lines)
