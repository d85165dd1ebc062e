"""Tiling arithmetic and the split by source image."""
from __future__ import annotations

from collections import Counter

import pytest

from rsdet_compress.data.record import Box
from rsdet_compress.data.split import split_sources
from rsdet_compress.data.tiling import (
    MAX_TILES_PER_IMAGE,
    Tile,
    boxes_in_tile,
    check_tile_count,
    scale_box,
    tile_count,
    tile_grid,
    tile_starts,
)
from rsdet_compress.errors import UserError


def test_tile_starts_cover_without_padding():
    # 1280 px, 640 tiles, 20% overlap: step 512 -> 0, 512, then aligned to the end at 640.
    assert tile_starts(1280, 640, 0.2) == [0, 512, 640]
    assert tile_starts(1280, 640, 0.0) == [0, 640]
    assert tile_starts(500, 640, 0.2) == [0]  # image smaller than a tile: one window
    assert tile_starts(700, 256, 0.0) == [0, 256, 444]
    for length, tile, ov in [(2560, 640, 0.2), (1764, 256, 0.1), (431, 128, 0.5)]:
        starts = tile_starts(length, tile, ov)
        assert starts[0] == 0 and starts[-1] + tile == length  # full coverage, all tiles full size
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert max(gaps) <= round(tile * (1 - ov))  # overlap is at least what was asked


def test_tile_starts_rejects_bad_overlap():
    with pytest.raises(ValueError):
        tile_starts(100, 50, 1.0)


def test_tile_grid_row_major_and_clamped():
    grid = tile_grid(684, 547, 256, 0.0)
    assert len(grid) == 3 * 3
    assert grid[0] == Tile(0, 0, 256, 256)
    assert grid[-1] == Tile(684 - 256, 547 - 256, 256, 256)
    assert tile_grid(100, 80, 256, 0.2) == [Tile(0, 0, 100, 80)]


def test_box_across_tile_border_is_clipped_or_dropped():
    tile = Tile(100, 100, 200, 200)
    inside = Box(150, 150, 190, 190, 0)
    half = Box(80, 150, 120, 190, 1)  # 20 of 40 px visible: 50%
    sliver = Box(60, 150, 110, 190, 0)  # 10 of 50 px visible: 20%
    outside = Box(0, 0, 50, 50, 0)
    dropped = Counter()
    kept = boxes_in_tile([inside, half, sliver, outside], tile, min_visibility=0.5, dropped=dropped)
    assert kept == [Box(50, 50, 90, 90, 0), Box(0, 50, 20, 90, 1)]
    assert dropped["box mostly outside a tile dropped"] == 1  # the sliver; "outside" is simply elsewhere
    kept_all = boxes_in_tile([sliver], tile, min_visibility=0.1)
    assert kept_all == [Box(0, 50, 10, 90, 0)]


def test_overlap_keeps_border_object_whole_in_a_neighbour():
    # A 60 px plane straddling x=640 with 0% overlap is cut in two; with 20% overlap one tile holds it whole.
    plane = Box(610, 100, 670, 160, 0)
    for ov, expect_whole in [(0.0, False), (0.2, True)]:
        tiles = tile_grid(1280, 640, 640, ov)
        whole = [t for t in tiles if boxes_in_tile([plane], t, 0.99)]
        assert bool(whole) is expect_whole


def test_rescale_scales_boxes():
    b = scale_box(Box(100, 200, 300, 260, 1, True), 0.5)
    assert (b.x1, b.y1, b.x2, b.y2, b.cls, b.difficult) == (50, 100, 150, 130, 1, True)


def test_split_by_source_is_seeded_and_disjoint():
    ids = [f"scene{i:03d}" for i in range(103)]
    a = split_sources(ids, (0.8, 0.1, 0.1), seed=0)
    b = split_sources(list(reversed(ids)), (0.8, 0.1, 0.1), seed=0)
    assert a == b  # depends on the set and the seed, not on the order
    assert Counter(a.values()) == {"train": 83, "val": 10, "test": 10}
    assert split_sources(ids, seed=1) != a
    assert split_sources(["x", "y", "z"], (0.8, 0.1, 0.1)).values().__len__() == 3
    small = Counter(split_sources(["x", "y", "z"], (0.8, 0.1, 0.1)).values())
    assert small == {"train": 1, "val": 1, "test": 1}  # every split gets an image when possible


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError):
        split_sources(["a"], (0.5, 0.5, 0.5))


@pytest.mark.parametrize("w,h,tile,ov", [(2560, 2560, 640, 0.2), (1764, 430, 256, 0.0), (431, 128, 128, 0.5),
                                       (100, 50, 640, 0.2), (700, 700, 256, 0.9), (999, 333, 33, 0.37)])
def test_tile_count_is_the_grid_size_without_building_it(w, h, tile, ov):
    assert tile_count(w, h, tile, ov) == len(tile_grid(w, h, tile, ov))


def test_tile_count_limit_names_the_option_and_count():
    assert check_tile_count(2560, 2560, 640, 0.2) == 25
    with pytest.raises(UserError, match=r"scene.tif: --overlap 0.999 .* 3,690,241 tiles .*limit 10,000"):
        check_tile_count(2560, 2560, 640, 0.999, image="scene.tif")
    # the other caller (predict's sliced windows) names its own option
    with pytest.raises(UserError, match="--overlap"):
        check_tile_count(20_000, 20_000, 64, 0.5)
    assert tile_count(20_000, 20_000, 640, 0.5) < MAX_TILES_PER_IMAGE  # a big real scene still fits
